"""Pipeline steps, one module per capability.

``STEPS`` maps the short names recipes use to ``module:Class``; modules are imported
only when a recipe uses them, so ``prefdata inspect`` never pays for torch. A recipe may
also name any ``package.module:Class`` of its own.
"""

STEPS = {
    "load_prompts": "prefdata.steps.load_prompts:LoadPrompts",
    "sample": "prefdata.steps.sample:Sample",
    "score_cdr": "prefdata.steps.cdr:ScoreCDR",
    "build_pairs": "prefdata.steps.build:BuildPairs",
}


def step_class(name: str):
    """The class for a recipe's step name (short name or ``module:Class``)."""
    import importlib

    target = STEPS.get(name, name)
    if ":" not in target:
        raise ValueError(f"unknown step '{name}'; known steps: {sorted(STEPS)} (or give 'package.module:Class')")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
