"""Decoding settings, shared by evaluate, chat, the app and the server: one sampling type."""

from __future__ import annotations

from dataclasses import dataclass, replace

from affiner.core.errors import AffinerError


@dataclass(frozen=True)
class Settings:
    """Decoding settings; temperature 0 decodes greedily."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 50
    max_new_tokens: int = 100
    seed: int | None = None
    # Above 1, a token the answer already holds is made less likely (core.decoding.penalties): a small model that
    # loops under greedy decoding stops looping.
    repetition_penalty: float = 1.0

    def generate_kwargs(self) -> dict:
        """For `model.generate`, with `core.decoding.penalties` as its logits processors."""
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def describe(self) -> str:
        decoding = "greedy" if self.greedy else (f"sampling (temperature {self.temperature}, top_p {self.top_p}, "
                                                 f"top_k {self.top_k}, seed {self.seed})")
        return decoding + (f", repetition penalty {self.repetition_penalty:g}" if self.repetition_penalty != 1.0 else "")

    def updated(self, key: str, value: str) -> "Settings":
        """A copy with one setting changed from text (`/set temperature=0.7`); unknown keys are errors."""
        kinds = {"temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int, "seed": int,
                 "repetition_penalty": float}
        if key not in kinds:
            raise AffinerError(f"unknown setting '{key}' (settings: {', '.join(kinds)}).")
        try:
            parsed = kinds[key](value)
        except ValueError:
            raise AffinerError(f"{key} must be a {kinds[key].__name__}, not '{value}'.") from None
        limits = {"temperature": parsed >= 0, "top_p": 0 < parsed <= 1, "top_k": parsed >= 0,
                  "max_new_tokens": parsed >= 1, "seed": True, "repetition_penalty": 0 < parsed <= MAX_PENALTY}
        if not limits[key]:
            raise AffinerError(f"{key}={value} is out of range.")
        return replace(self, **{key: parsed})


GREEDY = Settings(temperature=0.0)
MAX_PENALTY = 2.0  # beyond, answers avoid every word they have used, articles included: a typo, not a setting
