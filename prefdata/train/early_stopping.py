"""Early stopping and model selection on a validation metric.

``early_stopping: {metric: margin, patience: 2, mode: max}`` watches one eval metric (the
trainer's held-out pairs: ``loss``, ``reward_accuracy``, ``margin``, ``chosen_logp``,
``rejected_logp``, ``chosen_logp_change``, ``rejected_logp_change``). Every eval that
improves on the best so far saves a checkpoint, which rotation never deletes; after
``patience`` evals in a row without improvement training stops, and the final model is
the best checkpoint's weights, not the last step's. The step-0 eval (the initial policy)
is the baseline, not a candidate: the run always returns a trained model.

The state (best step and value, evals without improvement, stopped) travels in every
checkpoint, so a resumed run takes the same decisions as an uninterrupted one.
Prechelt, "Early Stopping — But When?", 1998 (patience on a validation criterion); the
λ-Harmonic RPO paper selects its model on a validation reward the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

METRICS = ("loss", "reward_accuracy", "margin", "chosen_logp", "rejected_logp", "chosen_logp_change",
           "rejected_logp_change")
LOWER_IS_BETTER = ("loss",)


def parse(spec: dict | None, where: str = "train config") -> tuple[str, int, str] | None:
    """(metric, patience, mode) from the config's mapping, or None; errors name the setting."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: 'early_stopping' must be a mapping {{metric, patience, mode}}, got {spec!r}")
    unknown = sorted(set(spec) - {"metric", "patience", "mode"})
    metric = str(spec.get("metric", "")).removeprefix("eval/")
    patience = spec.get("patience", 1)
    mode = spec.get("mode", "min" if metric in LOWER_IS_BETTER else "max")
    if unknown or metric not in METRICS:
        raise ValueError(f"{where}: 'early_stopping' expects {{metric, patience, mode}} with metric one of "
                         f"{list(METRICS)} (an eval metric); got {spec}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"{where}: 'early_stopping.patience' must be an integer >= 1 (evals without "
                         f"improvement before stopping), got {patience!r}")
    if mode not in ("min", "max"):
        raise ValueError(f"{where}: 'early_stopping.mode' must be min or max, got {mode!r}")
    return metric, patience, mode


@dataclass
class EarlyStopping:
    metric: str
    patience: int
    mode: str
    best_step: int | None = None
    best_value: float | None = None
    bad_evals: int = 0
    stopped: bool = False

    @classmethod
    def from_config(cls, spec: dict | None, state: dict | None = None) -> "EarlyStopping | None":
        parsed = parse(spec)
        if parsed is None:
            return None
        stopper = cls(*parsed)
        for key in ("best_step", "best_value", "bad_evals", "stopped"):
            if state and key in state:
                setattr(stopper, key, state[key])
        return stopper

    def update(self, step: int, metrics: dict) -> bool:
        """Record one eval (``eval/<name>`` keys); True when it is the best so far."""
        value = metrics.get(f"eval/{self.metric}")
        if value is None:
            return False  # another process of a multi-process run: process 0 evaluates
        better = self.best_value is None or (value < self.best_value if self.mode == "min" else value > self.best_value)
        if better:
            self.best_step, self.best_value, self.bad_evals = step, float(value), 0
        else:
            self.bad_evals += 1
            self.stopped = self.bad_evals >= self.patience
        return better

    def state(self) -> dict:
        return asdict(self)
