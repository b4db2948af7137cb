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
        """For `model.generate`, with `core.decoding.penalties` as its logits processors: those are the penalty, so a
        repetition penalty from the model's generation_config.json (Qwen2.5-Instruct sets one) is switched off, as
        evaluation, which never reads it, decodes."""
        if self.greedy:
            return {"do_sample": False, "repetition_penalty": 1.0}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": 1.0}

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def describe(self) -> str:
        decoding = "greedy" if self.greedy else (f"sampling (temperature {self.temperature}, top_p {self.top_p}, "
                                                 f"top_k {self.top_k}, seed {self.seed})")
        return decoding + (f", repetition penalty {self.repetition_penalty:g}" if self.repetition_penalty != 1.0 else "")

    def updated(self, key: str, value: str) -> "Settings":
        """A copy with one setting changed from text (`/set temperature=0.7`; `seed=none` samples unseeded again);
        unknown keys are errors."""
        kinds = {"temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int, "seed": int,
                 "repetition_penalty": float}
        if key not in kinds:
            raise AffinerError(f"unknown setting '{key}' (settings: {', '.join(kinds)}).")
        if key == "seed" and value.lower() in ("none", ""):
            return replace(self, seed=None)
        try:
            parsed = kinds[key](value)
        except ValueError:
            raise AffinerError(f"{key} must be a {kinds[key].__name__}, not '{value}'.") from None
        valid, expected = RULES[key]
        if not valid(parsed):
            raise AffinerError(f"{key}={value} is out of range: it must be {expected}.")
        return replace(self, **{key: parsed})


GREEDY = Settings(temperature=0.0)
# Below MIN_TEMPERATURE (0 aside, which is greedy) logits divided by it overflow into NaN, which sampling
# refuses; MAX_TEMPERATURE is OpenAI's bound.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 2.0
# Beyond MAX_PENALTY answers avoid every word they have used, articles included: a typo, not a setting; below
# MIN_PENALTY the logits of used words overflow the same way.
MIN_PENALTY, MAX_PENALTY = 0.1, 2.0
MAX_SEED = 2**63 - 1  # torch's seeds are signed 64-bit numbers
# What each decoding setting accepts, for every door it comes in by (flags, chat's /set, the API, the app).
RULES = {
    "temperature": (lambda v: v == 0 or MIN_TEMPERATURE <= v <= MAX_TEMPERATURE,
                    f"0 (greedy) or from {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}"),
    "top_p": (lambda v: 0 < v <= 1, "above 0 and at most 1"),
    "top_k": (lambda v: v >= 0, "0 (off) or more"),
    "max_new_tokens": (lambda v: v >= 1, "at least 1"),
    "seed": (lambda v: 0 <= v <= MAX_SEED, f"from 0 to {MAX_SEED}"),
    "repetition_penalty": (lambda v: MIN_PENALTY <= v <= MAX_PENALTY,
                           f"from {MIN_PENALTY:g} to {MAX_PENALTY:g} (1 is off)"),
}
