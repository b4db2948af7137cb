"""Which step's weights a run keeps, when it stops early, and what its held-out curve says afterwards.

The held-out probe (eval.every_steps) scores a fixed sample during training. `Selection` follows one of its
figures (train.best_by: the held-out loss by default): it knows the best step so far, whether the last probe
improved on it (the loop then saves that step's weights as the run's best), whether train.patience probes in a
row failed to (the loop then stops), and, at the end, whether the curve says the run stopped too early (still
improving at the last probe) or went on too long (worse for the last probes), with the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Probe figures a run can be selected by, and whether a higher value is better.
BEST_BY = {"loss": ("eval_loss", False), "contains": ("eval_contains", True), "rouge_l": ("eval_rouge_l", True)}
STILL_IMPROVING = 0.02  # the last probe beat the one before by more than 2 % of it: more steps would likely help
WORSE_FOR = 2  # probes in a row below the best at the end (the last by over 2 %): over-training, if not stopped early


@dataclass
class Selection:
    """The probes of one run, by one figure (`by`, a key of BEST_BY)."""

    by: str = "loss"
    patience: int | None = None
    keep_best: bool = True  # the run's weights are the best probe's, not the last step's
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, value) of every probe
    best_step: int | None = None
    best_value: float | None = None
    saved_step: int | None = None  # the step whose weights the run folder holds aside (run.best_path)

    @property
    def key(self) -> str:
        return BEST_BY[self.by][0]

    @property
    def higher_is_better(self) -> bool:
        return BEST_BY[self.by][1]

    def better(self, value: float, than: float | None) -> bool:
        if than is None:
            return True
        return value > than if self.higher_is_better else value < than

    def record(self, step: int, scores: dict[str, float]) -> bool:
        """Note a probe's scores; True when it is the best so far (its weights are then the ones to keep)."""
        value = scores.get(self.key)
        if value is None:
            return False
        self.history.append((step, value))
        if self.better(value, self.best_value):
            self.best_step, self.best_value = step, value
            return True
        return False

    @property
    def probes_since_best(self) -> int:
        return sum(1 for step, _ in self.history if self.best_step is not None and step > self.best_step)

    def should_stop(self) -> bool:
        """Whether train.patience probes in a row have not beaten the best."""
        return self.patience is not None and self.probes_since_best >= self.patience

    def restore(self, best: dict | None, history: list[tuple[int, float]], saved: bool) -> None:
        """Continue a resumed run's selection: its best as run.json recorded it (`saved`: its weights are still
        aside), its probes as the log did."""
        self.history = list(history)
        if best and best.get("by") == self.by:
            self.best_step, self.best_value = best["step"], best["value"]
            self.saved_step = self.best_step if saved else None

    def keeps_best(self, last_step: int) -> bool:
        """Whether the run's weights are the best probed step's, saved aside, rather than the last step's."""
        return self.keep_best and self.saved_step is not None and self.saved_step == self.best_step != last_step

    def summary(self) -> dict | None:
        """What run.json records of the selection (None before any probe)."""
        if self.best_step is None:
            return None
        return {"by": self.by, "metric": self.key, "step": self.best_step, "value": self.best_value}

    def advice(self, last_step: int, stopped_early: bool) -> list[str]:
        """What the held-out curve says about the run's length, in sentences with the numbers (none: fine)."""
        if len(self.history) < 2 or self.best_step is None:
            return []
        (before_step, before), (final_step, final) = self.history[-2], self.history[-1]
        name = f"held-out {self.by.replace('_', '-')}"
        if final_step == self.best_step and self._gain(before, final) > STILL_IMPROVING:
            return [f"the {name} was still improving at the last probe ({before:.4g} at step {before_step} -> "
                    f"{final:.4g} at step {final_step}): the run likely stopped too early. Train longer: raise "
                    "train.epochs (or train.max_steps), or the learning rate if the curve is slow."]
        worse = self.probes_since_best
        if stopped_early or (worse >= WORSE_FOR and self._gain(final, self.best_value) > STILL_IMPROVING):
            kept = (f"step {self.best_step}'s weights are the run's (train.keep_best)"
                    if self.keep_best and last_step != self.best_step else "")
            return [f"the {name} was worse than its best ({self.best_value:.4g} at step {self.best_step}) for the "
                    f"last {worse} probes (last: {final:.4g} at step {final_step}): the model went on past its best"
                    f"{'; ' + kept if kept else ''}. Fewer steps (train.epochs) or a lower train.learning_rate "
                    "would reach the same result sooner."]
        return []

    def _gain(self, before: float, after: float) -> float:
        """The relative improvement from `before` to `after` (positive: better)."""
        change = (after - before) if self.higher_is_better else (before - after)
        return change / max(abs(before), 1e-12)
