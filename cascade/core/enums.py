"""The names cascade spells everywhere: modes, task kinds, threshold sources and selection rules.

Each is an :class:`enum.StrEnum`, so a member *is* its plain value: it compares equal to
the string, and ``str()``, f-strings, CSV and JSON give that string.
"""

from __future__ import annotations

from enum import StrEnum


class TaskKind(StrEnum):
    """What a task's outputs are; methods and head inputs declare which kinds they suit."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"


class Mode(StrEnum):
    """What the last stage is: a network whose outputs are visible, or only answers."""

    WHITE_BOX = "white_box"
    BLACK_BOX = "black_box"


class ThresholdSource(StrEnum):
    """Where an operating point's thresholds were chosen."""

    #: chosen on the calibration split
    VAL = "val"
    #: certified on the calibration split (Learn then Test)
    GUARANTEED = "guaranteed"
    #: read off the test split (as the paper; not deployable)
    TEST = "test"
    #: a method's own fixed threshold (no choice made)
    FIXED = "fixed"


class Selection(StrEnum):
    """The rule that picked an operating point's thresholds."""

    #: the cheapest point whose accuracy degradation is within a target
    TARGET_AD = "target_ad"
    #: the most accurate point within a cost budget (a fraction of the big network's cost)
    BUDGET = "budget"
    #: a method's fixed threshold
    FIXED = "fixed"
    #: the most accurate point at the mean cost of another method's fixed point
    MATCHED_COST = "matched_cost"
    #: the most accurate point appealing at most a fraction of the inputs to the last stage
    APPEAL_BUDGET = "appeal_budget"
