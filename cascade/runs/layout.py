"""The names inside a run folder: its files, its checkpoints and the columns of ``samples.csv``.

Everything that writes or reads a run (the experiment, the router, export, serve, the
record) takes these names from here, so that a name changes in one place.

A run folder::

    <out>/
      config.yaml        CONFIG       the config as run (defaults filled in)
      metrics.json       METRICS      everything measured
      points.csv         POINTS       every operating point
      samples.csv        SAMPLES      one row per seed, split and input (columns below)
      table.md           TABLE        the report: the recommendation and the compact tables
      table_full.md      TABLE_FULL   every table of the report
      table.csv          TABLE_CSV    every operating point, one row each
      run.log            RUN_LOG      a line per phase
      complete.json      RECORD       written last: the run finished
      figures/           FIGURES
      tensorboard/       TENSORBOARD  training curves (config loggers: [{name: tensorboard}])
      checkpoints/       CHECKPOINTS  seed{seed}_{name}.pt (checkpoint_name)
        resume/          RESUME       an unfinished run's training state

Checkpoints (:func:`checkpoint_name`): ``seed{seed}_{name}.pt``, where ``name`` is
:data:`BIG` (the white-box last stage), :func:`stage_name` ``(k)`` (plain routed stage
``k``) or :func:`system_name` (a trained method's system in one mode).
:func:`checkpoint_path` gives the file in a run folder.

A routed stage's *config key* (:func:`stage_config_key`), used in messages, is
``little`` when the config has a single ``little:`` stage (or the task's default) and
``stages.<k>`` when it lists ``stages:``.

``samples.csv`` columns: ``seed``, ``split``, ``index``, ``target``, then per network
(``big``, ``stage<k>``, and ``<system>_stage<k>`` for each trained system's stages)
``<network>_<what>`` (:func:`column`) with ``what`` one of ``correct``, ``pred``
(classification), the criterion's errors (``rmse``...), ``score`` (the network's own
score, trained systems) and ``score_<scorer key>`` (a post-hoc method's score of a
plain stage, :func:`scorer_column`).
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"
METRICS = "metrics.json"
POINTS = "points.csv"
SAMPLES = "samples.csv"
TABLE = "table.md"
TABLE_FULL = "table_full.md"
TABLE_CSV = "table.csv"
RUN_LOG = "run.log"
#: the completion record (:mod:`cascade.runs.record`)
RECORD = "complete.json"
FIGURES = "figures"
#: the tensorboard logger's event files, one folder per seed and phase
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
#: where an unfinished run keeps its resumable training state
RESUME = f"{CHECKPOINTS}/resume"

#: checkpoint, column and ``networks`` name of the white-box last stage
BIG = "big"


def stage_name(k: int) -> str:
    """Checkpoint, column and ``networks`` name of plain routed stage ``k``."""
    return f"stage{k}"


def system_name(method: str, mode: str, variant: str) -> str:
    """Checkpoint name and column prefix of a trained method's system in one mode."""
    return "_".join(p for p in (method, variant, mode) if p)


def system_stage_name(system: str, k: int) -> str:
    """Column prefix of stage ``k`` of trained system ``system``."""
    return f"{system}_{stage_name(k)}"


def stage_config_key(k: int, listed: bool) -> str:
    """The config key of routed stage ``k``, for messages: ``stages.<k>`` when the config
    lists ``stages:`` (``listed``), else ``little``."""
    return f"stages.{k}" if listed else "little"


def checkpoint_name(seed: int, name: str) -> str:
    """The file name of network ``name``'s final weights for ``seed``: ``seed{seed}_{name}.pt``."""
    return f"seed{seed}_{name}.pt"


def checkpoint_path(run: str | Path, seed: int, name: str) -> Path:
    """``<run>/checkpoints/seed{seed}_{name}.pt``."""
    return Path(run) / CHECKPOINTS / checkpoint_name(seed, name)


def column(network: str, what: str) -> str:
    """The ``samples.csv`` column of ``network``'s ``what`` (``correct``, ``pred``, ``score``,
    an error name...): ``<network>_<what>``."""
    return f"{network}_{what}"


def scorer_column(network: str, key: str) -> str:
    """The ``samples.csv`` column of post-hoc scorer ``key``'s score of ``network``."""
    return column(network, f"score_{key}")
