"""Config validation, shipped recipes, and what a user sees when input is wrong: one paragraph, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from affiner.core.config import load_config, recipe_names
from affiner.core.errors import AffinerError
from affiner.core.models import load_model, load_tokenizer
from conftest import run_cli


@pytest.mark.parametrize("name", recipe_names())
def test_every_shipped_recipe_validates(name):
    config = load_config(name)
    assert config.name == name
    if config.method == "qlora":
        assert config.quantization == "nf4"


@pytest.mark.parametrize("name", recipe_names())
def test_recipes_naming_a_hub_dataset_say_how_to_prepare_it(name):
    """A 52k-row Hub dataset should be looked at (data card) before hours of training, with a command that works."""
    from importlib import resources

    config = load_config(name)
    if config.data.train.startswith("embedded:"):
        return
    text = (resources.files("affiner") / "recipes" / f"{name}.yaml").read_text(encoding="utf-8")
    prepare = next(line for line in text.splitlines() if line.startswith("#   affiner prepare"))
    output = prepare.split("--output ")[1].strip()
    assert prepare == f"#   affiner prepare {name} --output {output}"
    assert f"--set data.train={output}" in text


def test_reference_recipes_carry_the_reference_settings():
    gpt2 = load_config("gpt2-alpaca-lora")
    assert (gpt2.lora.r, gpt2.lora.alpha, gpt2.lora.dropout, gpt2.lora.target_modules) == (8, 32, 0.1, ["c_attn"])
    medium = load_config("gpt2-medium-alpaca-lora")
    assert (medium.data.max_response_words, medium.data.max_length, medium.train.epochs) == (80, 128, 2)
    assert (medium.train.batch_size, medium.train.gradient_accumulation, medium.train.learning_rate) == (8, 2, 3e-4)
    llama = load_config("llama-3.2-1b-glaive-qlora")
    assert llama.train.optimizer == "paged_adamw_32bit" and llama.train.max_grad_norm == 0.3
    assert (llama.data.max_length, llama.data.test_size, llama.data.seed) == (2048, 0.2, 42)
    assert set(llama.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert load_config("llama-3.2-1b-instruct-glossary-lora").data.template == "chat"


def test_overrides_are_typed_and_validated():
    config = load_config("quickstart", ["train.learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]",
                                        "train.group_by_length=false"])
    assert config.train.learning_rate == 1e-4
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.train.group_by_length is False
    with pytest.raises(AffinerError, match=r"train\.lerning_rate: unknown key, did you mean 'learning_rate'"):
        load_config("quickstart", ["train.lerning_rate=1e-4"])
    with pytest.raises(AffinerError, match="section.key=value"):
        load_config("quickstart", ["learning_rate"])


@pytest.mark.parametrize("text,message", [
    ("data: {train: x}\ntrain: {learning_rate: fast}\n", r"train\.learning_rate: input should be a valid number.*'fast'"),
    ("data: {train: x}\nlora: {rank: 8}\n", r"lora\.rank: unknown key.*allowed: r, alpha"),
    ("model: {base: gpt2}\n", r"data: required key is missing"),
    ("data: {train: x}\nmethod: dora\n", r"method: input should be 'lora', 'qlora' or 'full'"),
    ("data: {train: x}\ntrain: {save_steps: 0}\n",  # one problem, named by its key, saying both what it takes
     r"has 1 problem\(s\): train\.save_steps: input should be greater than or equal to 1 or be 'auto' \(got 0\)\.$"),
    ("data: {train: x}\ntrain: {save_steps: true}\n", r"'save_steps' must be a number, or auto, or null, not true"),
    ("data: {train: x}\noutput-dir: r\n", r"output-dir: unknown key, did you mean 'output_dir'"),  # not a type's tag
    ("data: {train: x}\ntrain: {save-steps: 5, max-steps: 3}\n",
     r"2 problem\(s\): train\.save-steps: unknown key, did you mean 'save_steps'.*train\.max-steps: unknown key"),
    ("data: {train: x, columns: {my-col: 1}}\n", r"data\.columns\.my-col: input should be a valid string \(got 1\)"),
    ("data: [1, 2\n", r"not valid YAML at line 2"),
    ("- a\n- b\n", r"must be a mapping"),
])
def test_bad_configs_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(AffinerError, match=message):
        load_config(str(path))


def test_a_problem_given_by_set_is_blamed_on_set_not_on_the_file(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("data: {train: x.jsonl}\ntrain: {epochs: 1}\n", encoding="utf-8")
    with pytest.raises(AffinerError, match=r"^--set has 1 problem\(s\): data\.maxlength: unknown key, did you mean "
                                           r"'max_length'.* \(from --set data\.maxlength=64\)\.$"):
        load_config(str(config), ["data.maxlength=64"])
    config.write_text("data: {train: x.jsonl}\ntrain: {epochs: one}\n", encoding="utf-8")
    with pytest.raises(AffinerError, match=r"^.*mine\.yaml has 2 problem\(s\): (?=.*train\.epochs: )(?=.*train\.max_steps: .* "
                                           r"\(from --set train\.max_steps=huit\))"):
        load_config(str(config), ["train.max_steps=huit"])


def test_unknown_recipe_and_missing_file():
    with pytest.raises(AffinerError, match="neither a YAML file nor a shipped recipe.*quickstart"):
        load_config("no-such-recipe")
    with pytest.raises(AffinerError, match="does not exist"):
        load_config("missing.yaml")


def test_a_folder_named_like_a_recipe_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "instruct").mkdir()  # a user's data folder
    assert load_config("instruct").name == "instruct"
    (tmp_path / "mine").mkdir()
    with pytest.raises(AffinerError, match="config file mine is a folder, not a YAML file"):
        load_config("mine")


def test_unreachable_hub_is_a_clear_error(offline_hub):
    with pytest.raises(AffinerError, match="cannot load tokenizer 'nobody/no-such-model'.*unreachable.*local folder"):
        load_tokenizer("nobody/no-such-model")
    with pytest.raises(AffinerError, match="cannot load model 'nobody/no-such-model'"):
        load_model("nobody/no-such-model")


def test_missing_model_folder_and_gguf():
    with pytest.raises(AffinerError, match="does not exist"):
        load_tokenizer("./models/nothing-here")
    with pytest.raises(AffinerError, match="GGUF file .* does not exist"):
        load_model("nothing.gguf")


def _affiner(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "affiner", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_errors_exit_2_without_traceback_and_write_nothing(tmp_path, tiny_gpt2):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data: {{train: {tmp_path / 'missing.jsonl'}}}\nmodel: {{base: {tiny_gpt2}}}\n"
                   f"output_dir: {tmp_path / 'runs'}\n", encoding="utf-8")
    for args in (["train", str(bad)], ["train", str(bad), "--set", "train.epochs=zero"],
                 ["evaluate", str(tmp_path)], ["run", "no-such-recipe"]):
        result = _affiner(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith(f"affiner {args[0]}: error: ")
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_cli_help_for_every_verb(tmp_path):
    for verb in ("run", "train", "evaluate", "chat", "config"):
        result = _affiner(verb, "--help", cwd=tmp_path)
        assert result.returncode == 0 and "affiner" in result.stdout


def test_a_new_run_never_overwrites_an_existing_one(tmp_path, tiny_gpt2):
    from affiner.experiments.workflow import train
    from conftest import write_config

    config = load_config(str(write_config(tmp_path, tiny_gpt2, "embedded:glossary-train.json",
                                          train={"max_steps": 1})))
    first = train(config)
    marker = (first / "adapter_model.safetensors").read_bytes()
    second = train(config)
    assert first != second and first.parent == second.parent
    assert (first / "adapter_model.safetensors").read_bytes() == marker


# ---------------------------------------------------------------------------------------- affiner config


def sections_of(model: type) -> list[tuple[str, type]]:
    """(prefix, section class) for RunConfig and every section under it, eval.judge included."""
    from pydantic import BaseModel

    found = [("", model)]
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found += [(f"{name}.{prefix}", section) for prefix, section in sections_of(field.annotation)]
    return found


def test_every_config_key_explains_itself():
    from affiner.core.config import RunConfig

    keys = [(f"{prefix}{name}", field) for prefix, section in sections_of(RunConfig)
            for name, field in section.model_fields.items()]
    assert len(keys) > 50 and "eval.judge.url" in dict(keys)
    undescribed = [key for key, field in keys if not (field.description or "").strip()]
    assert not undescribed, f"config keys without a description: {undescribed}"
    short = [key for key, field in keys if len(field.description) < 20]
    assert not short, f"descriptions too short to say what the key trades off: {short}"


def test_config_shows_every_key_with_value_default_type_and_description(capsys):
    from pydantic import BaseModel

    from affiner.core.config import RunConfig

    assert run_cli("config", "quickstart") == 0
    out = capsys.readouterr().out
    recipe = load_config("quickstart")
    rate_field = type(recipe.train).model_fields["learning_rate"]
    assert recipe.train.learning_rate != rate_field.default  # the recipe sets its own: both must be shown
    block = out.split("\n  train.learning_rate = ", 1)[1].split("\n  train.", 1)[0]
    assert block.startswith("0.001 *") and "default 0.0002" in block and "number > 0" in block
    assert " ".join(rate_field.description.split()) in " ".join(block.split())
    keys = [f"{prefix}{name}" for prefix, section in sections_of(RunConfig)
            for name, field in section.model_fields.items()
            if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))]
    assert [key for key in keys if f"\n  {key} = " not in out] == []
    titles = [line.split(":")[0] for line in out.splitlines()[1:] if line and not line.startswith(" ")]
    assert titles == ["top level", "model", "lora", "data", "train", "eval", "eval.judge"]
    assert "\n  lora.r = 16   (default 16; whole number >= 1)\n" in out  # the recipe keeps the default: no mark
    assert "\n  data.train = embedded:glossary-train.json *   (required; text)\n" in out


def test_config_with_overrides_changed_only_and_yaml(capsys, tmp_path):
    assert run_cli("config", "quickstart", "--set", "lora.r=8", "--changed") == 0
    out = capsys.readouterr().out
    assert "  lora.r = 8 *" in out and "  lora.alpha" not in out and "  train.learning_rate = 0.001 *" in out
    assert run_cli("config", "gpt2-alpaca-lora", "--yaml") == 0
    written = tmp_path / "my-run.yaml"
    written.write_text(capsys.readouterr().out, encoding="utf-8")
    assert load_config(str(written)) == load_config("gpt2-alpaca-lora")
    assert run_cli("config", "quickstart", "--set", "train.lerning_rate=1") == 2
    assert "train.lerning_rate: unknown key" in capsys.readouterr().err


def test_a_yaml_merge_key_brings_its_values_and_may_be_overridden(tmp_path):
    config = tmp_path / "merged.yaml"
    config.write_text("name: m\ndata: &data {train: embedded:glossary-train.json, template: qa}\n"
                      "train: {learning_rate: &rate 1.0e-4}\neval: {<<: {max_new_tokens: 12, batch_size: 3}, batch_size: 5}\n")
    loaded = load_config(str(config))
    assert (loaded.eval.max_new_tokens, loaded.eval.batch_size, loaded.train.learning_rate) == (12, 5, 1e-4)


def test_the_type_of_a_bounded_setting_that_may_be_auto_is_shown_in_words(capsys):
    assert run_cli("config", "instruct") == 0
    out = capsys.readouterr().out
    assert "(default auto; number > 0 or auto)" in out and "whole number >= 1 or auto, or null" in out
    assert "Annotated" not in out


def test_settings_refused_for_a_new_run_still_read_in_a_run_trained_before():
    """train.best_by: contains without eval.sample_size is refused when a run is about to train (it would do
    nothing), not by the schema: runs trained with it before must still evaluate, export and chat."""
    from affiner.training.run import check_probe_settings

    config = load_config("quickstart", ["train.best_by=contains", "train.patience=2", "eval.every_steps=null"])
    assert config.train.best_by == "contains"
    with pytest.raises(AffinerError, match="train.best_by: contains needs held-out answers"):
        check_probe_settings(config)
