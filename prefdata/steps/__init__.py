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
    "score_rm": "prefdata.steps.reward:ScoreRM",
    "judge_rubric": "prefdata.steps.judge:JudgeRubric",
    "judge_pairwise": "prefdata.steps.judge:JudgePairwise",
    "score_ensemble": "prefdata.steps.ensemble:Ensemble",
    "import_pairs": "prefdata.steps.import_pairs:ImportPairs",
    "import_ratings": "prefdata.steps.import_ratings:ImportRatings",
    "export": "prefdata.steps.export:Export",
    "noise": "prefdata.steps.noise:Noise",
    "ches": "prefdata.steps.ches:ScoreCHES",
    "ches_filter": "prefdata.steps.ches:CHESFilter",
    "rationale": "prefdata.steps.rationale:Rationale",
    "curriculum": "prefdata.steps.curriculum:Curriculum",
    "build_lists": "prefdata.steps.lists:BuildLists",
    "build_tree": "prefdata.steps.tree:BuildTree",
    "tree_pairs": "prefdata.steps.tree:TreePairs",
    "route": "prefdata.steps.route:Route",
    "argilla_push": "prefdata.steps.human:ArgillaPush",
    "argilla_pull": "prefdata.steps.human:ArgillaPull",
    "score_flr": "prefdata.steps.flr:ScoreFLR",
    "length_bias": "prefdata.steps.length_report:LengthBias",
    "score_gpm": "prefdata.steps.gpm:ScoreGPM",
    "intransitivity": "prefdata.steps.gpm:Intransitivity",
    "train_rm": "prefdata.steps.gpm:TrainRM",
    "train": "prefdata.steps.train:Train",
    "win_rates": "prefdata.steps.win_rates:WinRates",
}


def step_class(name: str):
    """The class for a recipe's step name (short name or ``module:Class``)."""
    import importlib

    target = STEPS.get(name, name)
    if ":" not in target:
        raise ValueError(f"unknown step '{name}'; known steps: {sorted(STEPS)} (or give 'package.module:Class')")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
