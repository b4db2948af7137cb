"""One typed config per run, read from one YAML file, with `--set key.path=value` overrides.

Every section forbids unknown keys, so a typo (`lerning_rate`) is an error naming the key, not
a silently ignored knob. Shipped recipes live in `affiner/recipes/` and are loaded by name.
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from affiner.core.errors import AffinerError

DEFAULT_RECIPE = "quickstart"


class _Section(BaseModel):
    # inf and nan are never a setting (a learning rate of .inf trains to NaN weights): refused by name.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    base: str = "embedded:gemma-3-270m"  # Hub id, local folder, .gguf file or embedded:gemma-3-270m
    revision: str | None = None  # a Hub branch, tag or commit: pins the weights a run is reproduced with
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    double_quant: bool = True  # QLoRA: quantise the quantisation constants too (~0.4 bit/weight less memory)
    # Runs Python code from the model's repository: needed by a few architectures, a risk with any other.
    trust_remote_code: bool = False


class LoraConfig(_Section):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["auto"] = Field("auto", min_length=1)


class DataConfig(_Section):
    train: str
    test: str | None = None
    format: Literal["auto", "alpaca", "qa", "conversations"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict)
    template: Literal["alpaca", "instruction", "qa", "chat"] = "alpaca"
    system_prompt: str | None = None
    max_length: int = Field(512, ge=8)
    max_response_words: int | None = Field(None, ge=1)
    test_size: float = Field(0.1, gt=0)
    seed: int = 42
    split: str = "train"
    max_rows: int | None = Field(None, ge=1)
    # Cleaning, shared by `affiner prepare` and `affiner train` so both see the same rows.
    dedupe: Literal["none", "exact", "normalized"] = "normalized"  # normalized also drops case/space/punctuation twins
    keep_matching: str | None = None  # regex: keep only rows whose text (question, input, answer) matches
    drop_matching: str | None = None  # regex: drop rows whose text matches ("As an AI language model")
    languages: list[str] | None = None  # keep rows detected in these languages ([en, fr]); ~0.1 ms per row

    @field_validator("keep_matching", "drop_matching")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"is not a valid regular expression ({exc})") from None
        return pattern

    @model_validator(mode="after")
    def _test_size_is_a_fraction_or_a_count(self) -> "DataConfig":
        if self.test_size >= 1 and self.test_size != int(self.test_size):
            raise ValueError("test_size must be a fraction below 1 or a whole number of rows")
        return self


class TrainConfig(_Section):
    learning_rate: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    optimizer: Literal["adamw", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"] = "adamw"
    seed: int = 42
    logging_steps: int = Field(10, ge=1)
    save_steps: int | None = Field(None, ge=1)
    save_total_limit: int = Field(2, ge=1)
    group_by_length: bool = True  # measured on the quickstart: padding 14 % -> 1 %, held-out loss no worse
    gradient_checkpointing: bool = False
    tracking: list[Literal["csv", "tensorboard", "mlflow"]] = Field(default_factory=lambda: ["csv"])  # several at once
    mlflow_uri: str | None = None  # null: a local store, sqlite in <output_dir>/mlflow.db; or a server's URL
    # An Accelerate config file (accelerate config's YAML), read when several processes train: distributed_type
    # FSDP with fsdp_version 2 shards the weights across them; DEEPSPEED with zero_stage 1 or 2 partitions the
    # optimizer state (and gradients); less memory per device, more communication. Otherwise DDP.
    accelerate_config: str | None = None


class JudgeConfig(_Section):
    url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    mode: Literal["absolute", "pairwise", "both"] = "both"
    concurrency: int = Field(4, ge=1)


class EvalConfig(_Section):
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1)
    max_questions: int | None = Field(None, ge=1)
    every_steps: int | None = Field(None, ge=1)
    sample_size: int = Field(8, ge=1)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)


class RunConfig(_Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: str = "runs"
    method: Literal["lora", "qlora", "full"] = "lora"
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def quantization(self) -> str | None:
        return "nf4" if self.method == "qlora" else None


def recipe_names() -> list[str]:
    folder = resources.files("affiner") / "recipes"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(config: str | None) -> tuple[str, str]:
    """Return (label for messages, YAML text) for a file path or a shipped recipe name."""
    name = config or DEFAULT_RECIPE
    path = Path(name)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise AffinerError(f"config file {name} does not exist. Pass a YAML file or one of the recipes: "
                               f"{', '.join(recipe_names())}.")
        return str(path), _read_text(path)
    recipe = resources.files("affiner") / "recipes" / f"{name}.yaml"
    if not recipe.is_file():
        raise AffinerError(f"'{name}' is neither a YAML file nor a shipped recipe. Recipes: "
                           f"{', '.join(recipe_names())}.")
    return f"recipe {name}", recipe.read_text(encoding="utf-8")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AffinerError(f"config file {path} is not valid UTF-8 (byte {exc.start}).") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: the second `train:`
    section would otherwise silently replace the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (first on line {seen[key]}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_yaml(label: str, text: str) -> dict[str, Any]:
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  (a SafeLoader: no Python objects)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise AffinerError(f"{label} is not valid YAML{where}: {problem}.") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise AffinerError(f"{label} must be a mapping of sections (model:, data:, train:, ...), "
                           f"not a {type(raw).__name__}.")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` strings; values are parsed as YAML so `1e-4`, `true`, `[a, b]` work."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AffinerError(f"--set {item!r} must look like section.key=value, "
                               f"for example --set train.learning_rate=1e-4.")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise AffinerError(f"--set {item!r}: '{part}' is a value, not a section.")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            node[parts[-1]] = value
    return raw


def load_config(config: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    label, text = resolve_config_path(config)
    raw = apply_overrides(parse_yaml(label, text), overrides or [])
    return validate_config(raw, label)


def _migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """Configs written before `train.tracking` existed (run folders included) still load."""
    train = raw.get("train")
    if isinstance(train, dict) and isinstance(train.get("tensorboard"), bool):
        enabled = train.pop("tensorboard")
        train.setdefault("tracking", ["csv", "tensorboard"] if enabled else ["csv"])
    return raw


def validate_config(raw: dict[str, Any], label: str) -> RunConfig:
    raw = _migrate(raw)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors()]
        raise AffinerError(f"{label} has {len(problems)} problem(s): " + "; ".join(problems) + ".") from None


def _describe(err: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key{_suggestion(err['loc'])}"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    given = err.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    message = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for our own validators
    return f"{path}: {message[0].lower()}{message[1:]}{shown}"


def _suggestion(loc: tuple) -> str:
    section: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = section.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        section = annotation
    allowed = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f", did you mean '{close[0]}'?" if close else ""
    return f"{hint} (allowed: {', '.join(allowed)})"


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"lora": {"r": 16}} -> {"lora.r": 16}: what MLflow parameters and run comparisons use."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat
