"""The model card: the run folder's README.md after training and after evaluation, and the export's, read back
with huggingface_hub as the Hub reads them: front matter, `model-index` with each metric once, no local path."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import write_config
from huggingface_hub import ModelCard

from affiner.core.card import card_data, hub_id, shown, write_run_card
from affiner.core.config import load_config
from affiner.core.files import read_json
from affiner.core.formatting import general_verdict
from affiner.core.models import tokenizer_for
from affiner.core.runfolder import RunFolder
from affiner.export import export as export_mod
from affiner.export.card import model_card
from affiner.training.run import train

NAME = "glossary-card"
# A path of this machine: /x/y or ~/x or C:\x, not the //host/x of a URL nor a relative data/x.
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])(?:/|~/|[A-Za-z]:\\)[\w.-]+[/\\]")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama) -> tuple[Path, str]:
    """A LoRA run of tiny Llama, its README.md as training left it, then evaluated on two questions."""
    from affiner.evaluation.evaluate import evaluate

    root = tmp_path_factory.mktemp("card-run")
    config = write_config(root, tiny_llama, "embedded:glossary-train.json", name=NAME,
                          train={"max_steps": 2, "learning_rate": 5e-2, "batch_size": 2, "seed": 0})
    folder = train(load_config(str(config)))
    after_training = (folder / "README.md").read_text()
    evaluate(folder, max_questions=2, general=True)  # refreshes README.md with the evaluation
    return folder, after_training


def assert_no_local_path(card: str, *paths: Path) -> None:
    for path in (*paths, Path.home()):
        assert str(path) not in card
    assert ABSOLUTE_PATH.findall(card) == []


def metrics_of(folder: Path) -> dict[str, tuple[float, float]]:
    """{metric: (tuned mean, base mean)} as the evaluation wrote them, for the metrics both have a number for."""
    evaluation = read_json(folder / "metrics.json")
    return {key: (values["tuned"]["mean"], values["base"]["mean"]) for key, values in evaluation["metrics"].items()
            if values.get("tuned", {}).get("mean") is not None and values.get("base", {}).get("mean") is not None}


def test_the_absolute_path_pattern_can_fail():
    assert ABSOLUTE_PATH.findall("from `/tmp/pytest-1/run`") and ABSOLUTE_PATH.findall("'C:\\runs\\x'")
    assert not ABSOLUTE_PATH.findall("see https://ai.google.dev/gemma/terms and data/train.json")


# ---------------------------------------------------------------------------------------- the run folder


def test_training_leaves_affiners_card_not_peft_placeholder(trained, tiny_llama):
    folder, card = trained
    assert "[More Information Needed]" not in card
    assert_no_local_path(card, folder, tiny_llama)
    data = ModelCard(card).data
    assert data.library_name == "peft" and "affiner" in data.tags and "lora" in data.tags
    assert data.base_model is None  # a local folder: named in the text, never by its path
    assert data.eval_results is None and "model-index" not in card
    assert f"\n# {NAME}\n" in card and folder.name not in card.split("## Evaluation")[0]
    assert f"a local model folder, `{tiny_llama.name}`" in card
    assert not list((folder / "checkpoints").rglob("README.md"))


def test_after_evaluation_model_index_holds_each_metric_once_with_its_values(trained, tiny_llama):
    folder, _ = trained
    card = ModelCard.load(folder / "README.md")
    assert_no_local_path(str(card), folder, tiny_llama)
    results = card.data.eval_results
    expected = metrics_of(folder)
    assert expected and card.data.model_name == NAME
    got = {result.metric_type: result.metric_value for result in results}
    assert len(got) == len(results)  # no metric twice
    assert got == {**{key: tuned for key, (tuned, _) in expected.items()},
                   **{f"{key}_base": base for key, (_, base) in expected.items()}}
    data_source = read_json(folder / "data.json")["train"]["source"]
    assert {(r.dataset_name, r.task_type) for r in results} == {(f"held-out split of {data_source}", "text-generation")}
    info = read_json(folder / "metrics.json")["metric_info"]
    for key in expected:  # one table row per metric
        assert len(re.findall(rf"^\| {re.escape(info[key]['label'])} \|", str(card), re.MULTILINE)) == 1
    assert "Not evaluated yet" not in str(card)


def test_the_card_tells_the_no_harm_verdict_the_evaluation_made(trained, tmp_path):
    """Whatever the task's table says, a reader of the card (and of the export's) learns what the fine-tune did to
    the general questions: the verdict and its figures as the report gives them."""
    folder, _ = trained
    general = read_json(folder / "metrics.json")["general"]
    verdict = general_verdict(general, "tuned")
    assert "### General ability (no-harm check)" in (folder / "README.md").read_text()
    assert verdict in " ".join((folder / "README.md").read_text().split())
    exported = (export_mod.export(folder, tmp_path / "export") / "README.md").read_text()
    assert verdict in " ".join(exported.split())


def test_a_folder_without_a_run_gets_no_card(tmp_path):
    write_run_card(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- the export


def test_the_export_card_adds_licence_usage_and_files_without_local_paths(trained, tiny_llama, tmp_path):
    folder, _ = trained
    out = export_mod.export(folder, tmp_path / "export")
    text = (out / "README.md").read_text()
    card = ModelCard.load(out / "README.md")
    assert_no_local_path(text, folder, tiny_llama, out)
    assert card.data.license == "other" and card.data.base_model is None and f"\n# {NAME}\n" in text
    assert card.data.eval_results == ModelCard.load(folder / "README.md").data.eval_results
    assert "PeftModel.from_pretrained(base, 'adapter')" in text and "relative to it" in text
    assert f"from_pretrained({tiny_llama.name!r}" in text and "- `adapter/`" in text


def test_a_pushed_card_loads_from_the_repository(trained):
    folder, _ = trained
    run = RunFolder(folder)
    config = run.config()
    text = model_card(run, config, run.template(), tokenizer_for(config, folder), ["adapter/", "merged/"],
                      push="my-org/glossary-card")
    assert "PeftModel.from_pretrained(base, 'my-org/glossary-card', subfolder='adapter')" in text
    assert "from_pretrained('my-org/glossary-card', subfolder='merged')" in text
    assert_no_local_path(text, folder)


def test_a_hub_base_and_hub_datasets_are_named_in_the_front_matter(trained):
    run = RunFolder(trained[0])
    config = run.config()
    config = config.model_copy(update={"model": config.model.model_copy(update={"base": "some-org/some-model"}),
                                       "data": config.data.model_copy(update={"test": "some-org/some-questions"})})
    data = card_data(run, config)
    assert data.base_model == "some-org/some-model" and data.datasets == ["some-org/some-questions"]


@pytest.mark.parametrize("source, expected", [
    ("/home/someone/data/train.json", "train.json"), ("~/x/model", "model"), ("C:\\runs\\base", "base"),
    ("2.0 of /srv/data/qa.json held out with seed 42", "2.0 of qa.json held out with seed 42"),
    ("data/train.json", "data/train.json"), ("some-org/some-data", "some-org/some-data"),
    ("embedded:glossary-train.json", "embedded:glossary-train.json"),
    ("https://example.org/x/y", "https://example.org/x/y"),
    (None, "?"),
])
def test_sources_are_named_without_their_paths(source, expected):
    assert shown(source) == expected


def test_hub_ids_are_never_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert hub_id("org/model") is None and hub_id("other/model") == "other/model"
    assert hub_id("embedded:gemma-3-270m") == "google/gemma-3-270m" and hub_id("/abs/model") is None


def test_the_cards_usage_code_gives_the_model_the_token_ids_it_was_trained_on(tmp_path, tiny_llama):
    """A chat template writes BOS as text: the card's snippet must not let the tokenizer add a second one."""
    from affiner.core.templates import Example, encode_prompt, load_template

    config = write_config(tmp_path, tiny_llama, "embedded:glossary-train.json", data={"template": "chat"},
                          train={"max_steps": 1})
    folder = train(load_config(str(config)))
    text = (export_mod.export(folder, tmp_path / "export") / "README.md").read_text()
    tokenizer, template = tokenizer_for(load_config(str(config)), folder), load_template(folder)
    line = next(line for line in text.splitlines() if line.startswith("inputs = tokenizer("))
    scope = {"tokenizer": tokenizer}
    exec(line, scope)
    trained_ids = encode_prompt(template, tokenizer, Example(instruction=RunFolder(folder).held_out()[0].instruction))
    assert scope["inputs"]["input_ids"][0].tolist() == trained_ids
    assert trained_ids.count(tokenizer.bos_token_id) == 1


def test_the_cards_examples_ask_the_runs_own_held_out_question(tmp_path, tiny_llama):
    """A French run's card and Modelfile show a French question, quoted for the shell, not the glossary's."""
    question = "Qu’est-ce qu’un « adjectif » ? L'exemple"
    test = tmp_path / "test.json"
    test.write_text(json.dumps([{"question": question, "answer": "Un mot."}] * 2), encoding="utf-8")
    folder = train(load_config(str(write_config(tmp_path, tiny_llama, "embedded:glossary-train.json",
                                                data={"test": str(test)}, train={"max_steps": 1}))))
    out = export_mod.export(folder, tmp_path / "export", gguf=True, gguf_type="f32")
    card, modelfile = (out / "README.md").read_text(), (out / "Modelfile").read_text()
    assert "QUILT" not in card and "QUILT" not in modelfile
    assert f"inputs = tokenizer({f'### Question: {question}' + chr(10) + '### Answer:'!r}" in card
    spoken = shlex.quote(question)
    for text in (card, modelfile):
        assert re.search(rf"ollama run [\w-]+ {re.escape(spoken)}\n", text)
