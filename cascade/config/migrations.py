"""Keys of older configs: each gets a one-line message saying what replaced it, instead
of "unknown key"."""

from __future__ import annotations

from typing import Any

#: keys of the configs before the single pipeline, with what replaces each (a one-line
#: migration error instead of "unknown key")
MIGRATIONS = {
    "appealnet": "AppealNet is a routing method now: list it under methods: as {name: appealnet, ...} with the "
                 "same predictor/lambda/approximator_loss/predictor_target keys; appealnet.finetune is the "
                 "top-level finetune:",
    "cascade": "a K-stage cascade is stages: [...] (the routed networks) plus big: (its last network, white-box) or "
               "modes: [black_box] with oracle_mflops:; cascade.methods.reinforce and cascade.policy are the options of "
               "methods: [{name: reinforce, policy: ..., alphas: ...}], cascade.budgets is evaluation.budgets",
    "evaluation.methods": "moved to the top-level methods: list",
}


def migration_errors(data: dict[str, Any]) -> list[str]:
    """``"<key>: <what replaces it>"`` for each old key in the parsed config ``data``."""
    errors = [f"{key}: {why}" for key, why in MIGRATIONS.items() if "." not in key and key in data]
    evaluation = data.get("evaluation")
    if isinstance(evaluation, dict) and "methods" in evaluation:
        errors.append(f"evaluation.methods: {MIGRATIONS['evaluation.methods']}")
    return errors
