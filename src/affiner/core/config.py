"""One typed config per run, read from one YAML file, with `--set key.path=value` overrides.

Every section forbids unknown keys, so a typo (`lerning_rate`) is an error naming the key, not
a silently ignored knob. Shipped recipes live in `affiner/recipes/` and are loaded by name.
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from affiner.core.errors import AffinerError
from affiner.core.yaml_input import apply_overrides, first_non_text, parse_yaml, shortened
from affiner.core.settings import MAX_PENALTY, MIN_PENALTY

DEFAULT_RECIPE = "quickstart"


class _Section(BaseModel):
    # inf and nan are never a setting (a learning rate of .inf trains to NaN weights): refused by name.
    # Every field's description is its one explanation: `affiner config` shows it next to the value.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_true_or_false_for_numbers(cls, data: Any) -> Any:
        """pydantic's lax mode (which reads `1e-4`, a string to YAML, as a number) takes true for 1 and false for
        0: `--set train.learning_rate=true` would train at a learning rate of 1."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if isinstance(value, bool) and field is not None and _numeric(field.annotation):
                    raise ValueError(f"'{name}' must be a number{_or_words(field.annotation)}, not "
                                     f"{str(value).lower()}")
        return data


class ModelConfig(_Section):
    base: str = Field("embedded:gemma-3-270m", description=(
        "the model to fine-tune: a Hub id, a local folder, a .gguf file, or embedded:gemma-3-270m (shipped, "
        "no download); larger models answer better and cost more memory and time"))
    revision: str | None = Field(None, description=(
        "a Hub branch, tag or commit: pins the weights a run is reproduced with (null: the latest)"))
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description=(
        "what the model computes in: auto picks bf16 on a GPU that has it natively, else fp16 with a gradient "
        "scaler (fp32 for Gemma 3, which overflows in fp16); on a CPU, bf16 where it is measured at least 1.5x "
        "faster, else fp32; fp16/bf16 halve memory, fp32 is the slowest and most exact"))
    double_quant: bool = Field(True, description=(
        "QLoRA: quantise the quantisation constants too, about 0.4 bit per weight less memory for a little time"))
    trust_remote_code: bool = Field(False, description=(
        "run Python code from the model's repository: a few architectures need it, any other is a risk"))


class LoraConfig(_Section):
    r: int = Field(16, ge=1, description=(
        "rank of the adapter's matrices: higher learns more, costs more memory and time, and can overfit"))
    alpha: float = Field(32, gt=0, description=(
        "scale of the update (alpha / r): higher moves the model further per step, like a larger learning rate"))
    dropout: float = Field(0.05, ge=0, lt=1, description=(
        "dropout on the adapter's input: regularises large varied data, only slows memorising a few facts; on a CPU "
        "drawing its masks costs time too (instruct: 0.05 trained 1.21x slower than 0, same held-out loss)"))
    target_modules: list[str] | Literal["auto"] = Field("auto", min_length=1, description=(
        "the layers that get an adapter, by name (c_attn, q_proj, ...): auto is every linear layer of the "
        "blocks; fewer layers train faster with less capacity"))


class DataConfig(_Section):
    train: str = Field(description=(
        "training data: a JSON, JSONL, CSV or Parquet file, a Hub dataset, an `affiner prepare` folder, or "
        "embedded:glossary-train.json"))
    test: str | None = Field(None, description=(
        "held-out data, in the same forms (null: data.test_size rows are split off the training data)"))
    format: Literal["auto", "alpaca", "qa", "conversations"] = Field("auto", description=(
        "how rows become examples: alpaca (instruction, input, output), qa (question, answer), conversations "
        "(role/content messages); auto guesses from the columns"))
    columns: dict[str, str] = Field(default_factory=dict, description=(
        "the data's own column names, e.g. {instruction: prompt, output: completion, group: topic}; rows of "
        "one group stay on one side of the split"))
    template: Literal["alpaca", "instruction", "qa", "chat"] = Field("alpaca", description=(
        "the prompt layout, saved with the run and reused by every command: alpaca, instruction, qa, or chat "
        "(the model's own chat template, for instruct models)"))
    system_prompt: str | None = Field(None, description=(
        "a system message put before every prompt (null: none): steers every answer, costs tokens each time"))
    max_length: int = Field(512, ge=8, description=(
        "tokens per example, prompt and answer; longer rows are dropped and counted, never truncated: higher "
        "keeps more rows and costs memory"))
    max_response_words: int | None = Field(None, ge=1, description=(
        "drop rows whose answer is longer than this many words (null: no limit): shorter answers train faster "
        "and teach a terser model"))
    test_size: float = Field(0.1, gt=0, description=(
        "held out when data.test is null: a fraction below 1, or a number of rows; more gives steadier "
        "scores and leaves less to train on"))
    seed: int = Field(42, description="seed of the train/test split: the same seed, the same split")
    split: str = Field("train", description="the split of a Hub dataset to read (train, validation, ...)")
    max_rows: int | None = Field(None, ge=1, description=(
        "read only the first N rows of the training source (null: all): a quick trial on large data; cleaning, "
        "and the held-out split when there is no data.test, then work on these N, so fewer may be trained on"))
    dedupe: Literal["none", "exact", "normalized"] = Field("normalized", description=(
        "drop duplicate rows: exact, or normalized (also case, spacing and punctuation twins), or none"))
    keep_matching: str | None = Field(None, description=(
        "a regular expression: keep only rows whose text (question, input, answer) matches (null: all)"))
    drop_matching: str | None = Field(None, description=(
        "a regular expression: drop rows whose text matches, e.g. 'As an AI language model' (null: none)"))
    languages: list[str] | None = Field(None, description=(
        "keep only rows detected in these languages, e.g. [en, fr] (null: all); about 0.1 ms per row"))

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
    learning_rate: float = Field(2e-4, gt=0, description=(
        "step size of the optimizer: higher learns faster and can diverge; LoRA takes 1e-4 to 1e-3, a full "
        "fine-tune about ten times less"))
    epochs: Annotated[float, Field(gt=0)] | Literal["auto"] = Field("auto", description=(
        "passes over the training data (fractions allowed): more recalls the data better and risks overfitting; "
        "auto: at least 3 passes and 90 optimizer steps on small data, at most 30 passes (30 rows of batch 8: 23 "
        "passes), about 3000 steps on large data, never under one pass (training/batches.py)"))
    max_steps: int | None = Field(None, ge=1, description=(
        "stop after this many optimizer steps, whatever the epochs (null: the epochs decide)"))
    batch_size: int = Field(8, ge=1, description=(
        "examples per forward pass: higher is faster per example and costs memory"))
    gradient_accumulation: int = Field(1, ge=1, description=(
        "forward passes per optimizer step: emulates a batch this many times larger without more memory"))
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description=(
        "how the learning rate falls after warmup: cosine, linear, or constant"))
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description=(
        "share of the steps spent raising the learning rate from 0: steadies the first steps"))
    weight_decay: float = Field(0.0, ge=0, description=(
        "pulls the trained weights towards 0: regularises, and slows learning when too high"))
    max_grad_norm: float | None = Field(1.0, gt=0, description=(
        "clip the gradient to this norm (null: no clipping): lower is steadier and slower"))
    optimizer: Literal["adamw", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"] = Field("adamw", description=(
        "adamw; the 8bit ones (bitsandbytes) keep the optimizer state in less memory; the paged ones move it to "
        "CPU memory when the GPU fills up"))
    patience: int | None = Field(None, ge=1, description=(
        "stop when this many held-out probes in a row (eval.every_steps) did not beat the best one by "
        "train.best_by (null: never stop early): saves the steps past the best, a noisy probe may stop too soon"))
    best_by: Literal["loss", "contains", "rouge_l"] = Field("loss", description=(
        "the held-out probe's figure that picks the best step and drives train.patience: loss (of the reference "
        "answers, steady even on a few questions) or contains / rouge_l (of generated answers, noisier; they need "
        "eval.sample_size)"))
    keep_best: bool = Field(True, description=(
        "the run's adapter is the best probed step's (by train.best_by), not the last step's: protects against "
        "over-training; false keeps the last step"))
    seed: int = Field(42, description="seed of the adapter's initial weights and of the batch order")
    logging_steps: int = Field(10, ge=1, description=(
        "log the loss every N steps to metrics.jsonl and the trackers: lower gives finer curves"))
    save_steps: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field("auto", description=(
        "checkpoint every N steps, to resume after a crash or a kill -9 (Ctrl-C, SIGTERM, out of memory and a "
        "diverged loss save the last good step anyway, unless sharded); each writes the adapter (or model) and "
        "optimizer state. auto: at the first step 10 minutes of training after the last one, or 20 times the last "
        "one's writing time if longer (at most ~5 % of the time spent writing); a run of a few minutes writes "
        "none, a finished run removes them; null: none"))
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept, the oldest removed: more costs disk")
    group_by_length: bool = Field(True, description=(
        "batch examples of similar lengths: padding 14 % -> 1 % on the quickstart, same held-out loss"))
    gradient_checkpointing: bool = Field(False, description=(
        "recompute activations in the backward pass: much less memory, about 30 % slower"))
    tracking: list[Literal["csv", "tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["csv"], description=(
            "where metrics go besides metrics.jsonl, several at once: csv (metrics.csv), tensorboard, mlflow "
            "(a local store in <output_dir>/mlflow.db), wandb (Weights & Biases, project $WANDB_PROJECT or "
            "the run's name)"))
    mlflow_uri: str | None = Field(None, description=(
        "with mlflow: a tracking server's URL (null: a local SQLite store in <output_dir>/mlflow.db)"))
    accelerate_config: str | None = Field(None, description=(
        "an Accelerate config file, read when several processes train: FSDP (fsdp_version 2) shards the "
        "weights, DeepSpeed ZeRO 1/2 partitions the optimizer state: less memory per device, more "
        "communication (null: DDP)"))


class JudgeConfig(_Section):
    url: str | None = Field(None, description=(
        "an OpenAI-compatible endpoint whose model grades the answers, e.g. http://127.0.0.1:11434/v1 "
        "(null: no judge); catches right answers phrased differently, costs a request per answer"))
    model: str | None = Field(None, description="the model name the judge endpoint serves, e.g. gemma3:27b")
    api_key_env: str | None = Field(None, description=(
        "the environment variable holding the judge's API key (null: none); the key is written nowhere"))
    mode: Literal["absolute", "pairwise", "both"] = Field("both", description=(
        "absolute grades each answer against the reference; pairwise asks which of base and tuned is better, "
        "in both orders; both asks both, twice the requests"))
    concurrency: int = Field(4, ge=1, description=(
        "judge requests in flight at once: faster, and more load on the endpoint"))


# The figures a report can lead with (eval.headline, evaluate --headline).
Headline = Literal["auto", "contains", "contains_key", "exact_match", "rouge_l", "bleu", "chrf", "embedding"]
HEADLINES: tuple[str, ...] = get_args(Headline)


class EvalConfig(_Section):
    max_new_tokens: int = Field(64, ge=1, description=(
        "answer length limit: longer answers count as not stopping; higher costs time"))
    batch_size: int = Field(64, ge=1, description=(
        "questions answered together (an answer that ends makes room for the next question): faster, more memory "
        "(halved by itself when out of memory); held-out losses take at most this many rows and 4096 padded "
        "tokens a batch"))
    repetition_penalty: float = Field(1.0, ge=MIN_PENALTY, le=MAX_PENALTY, description=(
        "above 1, tokens the answer already holds are made less likely (transformers' repetition penalty over "
        "the answer's own tokens: the question's words stay free; for base and tuned alike, in the report's "
        "settings line; chat and serve use the run's value): a small model that loops under greedy decoding stops "
        "looping, but answers repeat their own words less, which can lower word-overlap scores a little; 1: off"))
    max_questions: int | None = Field(None, ge=1, description=(
        "answer only the first N held-out questions (null: all): quicker, wider intervals"))
    every_steps: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field("auto", description=(
        "during training, score a held-out sample every N steps (auto: 10 times per run; null: never): shows "
        "when the model learned, picks the best step (train.keep_best) and can stop early (train.patience); "
        "costs generation time"))
    sample_size: int = Field(0, ge=0, description=(
        "held-out questions the probe also answers (its first ones), logging eval_contains, eval_stop_rate and "
        "eval_rouge_l: costs generation time at every probe (0: the held-out loss alone, of the first 32 questions, "
        "a forward pass; the step chosen by it favours the held-out loss of the final report slightly)"))
    key_before: Annotated[str, Field(min_length=1)] | None = Field(None, description=(
        "the key part of each reference, scored as 'contains the key' beside 'contains the reference': the text "
        "before this separator (':' when references read 'Expansion: a description'); a row's own `key` field "
        "wins; null: only rows with a key field have one. The key is the headline when any row has one: an "
        "answer with the right key and a reworded rest is right"))
    headline: Headline = Field(
        "auto", description=(
            "the figure the report, the table's example and `affiner runs` lead with, and that ranks the largest wins "
            "and regressions (auto: contains_key when the rows have keys, else contains, right or wrong answers as "
            "in a glossary); open-ended tasks whose answers never repeat a reference word for word (instructions, "
            "explanations) read better by rouge_l, chrf or embedding, graded closeness to the reference"))
    general: bool = Field(True, description=(
        "also answer affiner's general set (80 everyday questions, English and French) with base and tuned: the "
        "report says whether the fine-tune cost general ability; false saves that time"))
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="an LLM judge of the answers, through an OpenAI-compatible endpoint")


class RunConfig(_Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description=(
        "the run's name: its folder is <output_dir>/<name>-<timestamp>"))
    output_dir: str = Field("runs", description="where run folders are written")
    method: Literal["lora", "qlora", "full"] = Field("lora", description=(
        "lora: a small adapter, base frozen; qlora: the same on a 4-bit base, less memory, a little slower and "
        "less exact; full: every weight trained, the most memory, a whole model to save"))
    model: ModelConfig = Field(default_factory=ModelConfig, description="the model fine-tuned, and how it is loaded")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="the adapter (lora and qlora)")
    data: DataConfig = Field(description="what to train and evaluate on, and how it is cleaned")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the training loop: steps, optimizer, checkpoints, trackers")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="the before/after evaluation")

    @property
    def quantization(self) -> str | None:
        return "nf4" if self.method == "qlora" else None


def _kinds(annotation: Any) -> set:
    """The plain types an annotation admits: `Annotated[float, ...] | Literal["auto"] | None` -> {float, str, None}."""
    if isinstance(annotation, type):
        return {annotation}
    if get_origin(annotation) is Literal:
        return {type(value) for value in get_args(annotation)}
    return set().union(*(_kinds(part) for part in get_args(annotation)[:1 if get_origin(annotation) is Annotated
                                                                      else None]))


def _or_words(annotation: Any) -> str:
    """What a numeric key takes besides a number: `... | Literal["auto"] | None` -> ", or auto, or null"."""
    words = [str(v) for part in get_args(annotation) if get_origin(part) is Literal for v in get_args(part)]
    return "".join(f", or {word}" for word in words + (["null"] if type(None) in _kinds(annotation) else []))


def _numeric(annotation: Any) -> bool:
    kinds = _kinds(annotation)
    return bool(kinds & {int, float}) and bool not in kinds


def recipe_names() -> list[str]:
    folder = resources.files("affiner") / "recipes"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(config: str | None) -> tuple[str, str]:
    """Return (label for messages, YAML text) for a file path or a shipped recipe name."""
    name = config or DEFAULT_RECIPE
    path = Path(name)
    # A recipe's name wins over a folder of the same name (`instruct/` holding a user's data).
    if path.suffix in {".yaml", ".yml"} or path.is_file() or (path.exists() and name not in recipe_names()):
        if not path.is_file():
            what = "is a folder, not a YAML file" if path.is_dir() else (
                "is not a regular file" if path.exists() else "does not exist")
            raise AffinerError(f"config file {name} {what}. Pass a YAML file or one of the recipes: "
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


def load_config(config: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    label, text = resolve_config_path(config)
    return validate_config(apply_overrides(parse_yaml(label, text), overrides or []), label, overrides or [])


def _migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """Configs written before `train.tracking` existed (run folders included) still load."""
    train = raw.get("train")
    if isinstance(train, dict) and isinstance(train.get("tensorboard"), bool):
        enabled = train.pop("tensorboard")
        train.setdefault("tracking", ["csv", "tensorboard"] if enabled else ["csv"])
    return raw


def validate_config(raw: dict[str, Any], label: str, overrides: list[str] = ()) -> RunConfig:
    """`raw` (from `label`, then the --set `overrides`) checked: a problem is blamed on the --set giving its key."""
    raw = _migrate(raw)
    if (where := first_non_text(raw)) is not None:
        raise AffinerError(f"{label}: {where or '(top level)'} holds a lone UTF-16 surrogate (an escape such as "
                           "\\ud800 without its pair), which is no text any file or tokenizer can hold; remove it.")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        given = {item.partition("=")[0].strip(): item for item in overrides}  # key: the --set that gave it
        lines = [(p, given.get(p.partition(":")[0])) for p in _problems(exc.errors())]
        raise AffinerError(f"{'--set' if all(item for _, item in lines) else label} has {len(lines)} problem(s): "
                           + "; ".join(f"{p} (from --set {item})" if item else p for p, item in lines) + ".") from None


def _problems(errors: list[dict[str, Any]]) -> list[str]:
    """One line per key: a value refused by every type a key allows (a number or `auto`) is one problem, not one
    per type, and is named by its key alone (pydantic adds each type's tag, `constrained-int`, to the path)."""
    by_key: dict[tuple, list[dict[str, Any]]] = {}
    for err in errors:
        loc = err["loc"]  # an unknown key is the user's own word, whatever it looks like
        key = loc if err["type"] == "extra_forbidden" else [p for i, p in enumerate(loc) if not (
            i and isinstance(p, str) and UNION_TAG.fullmatch(p))]
        by_key.setdefault(tuple(key), []).append(err)
    return [_describe(loc, errs) for loc, errs in by_key.items()]


# The tag pydantic puts in an error's path for each member of a union: `constrained-int`, `literal['auto']`, `int`.
UNION_TAG = re.compile(r"constrained-\w+|\w+(-\w+)*\[.*\]|int|float|str|bool|none")


def _describe(loc: tuple, errs: list[dict[str, Any]]) -> str:
    path, err = ".".join(str(p) for p in loc) or "(top level)", errs[0]
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key{_suggestion(loc)}"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    shown = "" if isinstance(given := err.get("input"), dict) else f" (got {shortened(given)})"
    messages = [e["msg"].removeprefix("Value error, ") for e in errs]  # pydantic's prefix for our own validators
    message = messages[0] + "".join(" or " + m.removeprefix("Input should ") for m in messages[1:])
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
