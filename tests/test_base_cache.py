"""The base's answers and losses are kept for the next evaluation with the same base weights, questions, template
and decoding: a run evaluated again, or the runs of a sweep, answer with the base once. Anything that could
change them (weights, decoding, questions) misses the cache; --no-base-cache answers again."""

from __future__ import annotations

import json

import pytest
import torch

from affiner.core.config import load_config
from affiner.evaluation import base_cache, evaluate as evaluate_module
from affiner.evaluation.evaluate import evaluate
from affiner.experiments import workflow
from conftest import run_cli, write_config

KEPT = "base answers and losses"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_gpt2):
    folder = tmp_path_factory.mktemp("base-cache")
    config = write_config(folder, tiny_gpt2, "embedded:glossary-train.json", train={"max_steps": 1},
                          eval={"max_new_tokens": 6, "max_questions": 4, "general": True})
    return workflow.train(load_config(str(config)))


@pytest.fixture
def generations(monkeypatch):
    """Which models generated answers in this test ("base" for the base's answers, with the general set's)."""
    seen: list[str] = []
    real = evaluate_module.generate

    def counting(*args, desc: str = "", **kwargs):
        seen.append(desc.split()[0])
        return real(*args, desc=desc, **kwargs)

    monkeypatch.setattr(evaluate_module, "generate", counting)
    return seen


def test_a_second_evaluation_answers_with_the_base_from_the_cache(run, generations):
    first = evaluate(run)
    assert KEPT not in first["settings"]
    assert generations == ["base", "tuned"]
    generations.clear()
    second = evaluate(run)
    assert generations == ["tuned"]
    assert second["settings"][KEPT].startswith("from an earlier evaluation")
    for key in ("contains", "rouge_l", "loss"):
        assert second["metrics"][key]["base"] == first["metrics"][key]["base"]
    assert second["general"]["figures"]["base"] == first["general"]["figures"]["base"]
    assert [e["answers"]["base"] for e in second["examples"]] == [e["answers"]["base"] for e in first["examples"]]


def test_other_decoding_or_no_base_cache_answers_again(run, generations):
    evaluate(run)
    generations.clear()
    evaluate(run, max_new_tokens=5)  # another limit: other answers
    assert "base" in generations
    generations.clear()
    assert run_cli("evaluate", str(run), "--no-base-cache") == 0
    assert "base" in generations
    assert KEPT not in json.loads((run / "metrics.json").read_text())["settings"]


def test_changed_weights_change_the_key(tiny_gpt2):
    from affiner.core.models import load_model

    model = load_model(str(tiny_gpt2))
    before = base_cache.weights_fingerprint(model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert base_cache.weights_fingerprint(model) != before


def cut_short(entry: dict) -> str:
    return json.dumps(entry)[:40]


def one_answer_left(entry: dict) -> str:
    return json.dumps({**entry, "answers": entry["answers"][:1]})


def tokens_as_text(entry: dict) -> str:
    return json.dumps({**entry, "answers": [{**entry["answers"][0], "tokens": "x"}, *entry["answers"][1:]]})


def losses_of_other_rows(entry: dict) -> str:
    return json.dumps({**entry, "losses": [entry["losses"][0][:1], entry["losses"][1][:1]]})


@pytest.mark.parametrize("damage", [cut_short, one_answer_left, tokens_as_text, losses_of_other_rows])
def test_a_damaged_entry_is_answered_again_and_rewritten(run, generations, damage):
    """An entry cut short, or whole JSON of another shape (edited by hand, or left by another version), is a miss:
    never an internal error, never answers scored against the wrong questions."""
    first = evaluate(run)
    entries = list(base_cache.folder().glob("*.json"))
    assert len(entries) == 1
    whole = json.loads(entries[0].read_text())
    entries[0].write_text(damage(whole))
    generations.clear()
    again = evaluate(run)
    assert "base" in generations
    assert json.loads(entries[0].read_text()) == {**whole, "seconds": json.loads(entries[0].read_text())["seconds"]}
    assert again["metrics"]["rouge_l"]["base"] == first["metrics"]["rouge_l"]["base"]


def test_a_changed_config_tokenizer_or_answering_code_changes_the_key(tiny_gpt2, monkeypatch):
    """The same weights under another config (a revision changing the activation) or tokenizer (a BOS fix), or
    answered by changed affiner code (how answers are cut), give other answers: another key."""
    from affiner.core.models import load_model, load_tokenizer
    from affiner.core.settings import GREEDY
    from affiner.core.templates import Example, build_template

    model, tokenizer = load_model(str(tiny_gpt2)), load_tokenizer(str(tiny_gpt2))
    template, questions = build_template("qa", tokenizer), [Example("What is QUILT?", "A quilt.")]

    def key() -> str:
        return base_cache.cache_key(model, tokenizer, template, questions, [], 8, 4, GREEDY)

    before = key()
    assert key() == before
    model.config.layer_norm_epsilon *= 10
    assert key() != before
    model.config.layer_norm_epsilon /= 10
    assert key() == before
    with monkeypatch.context() as patched:
        patched.setattr(tokenizer, "encode", lambda *a, **k: [0])
        patched.setattr(type(tokenizer), "__call__", lambda self, text, **k: {"input_ids": [tokenizer.bos_token_id or 0, 1]})
        assert key() != before
    assert key() == before
    monkeypatch.setattr(base_cache, "code_fingerprint", lambda: "changed code")
    assert key() != before


@pytest.mark.parametrize("module", ["general", "models"])
def test_the_general_sets_answer_limit_and_the_context_cut_are_in_the_code_fingerprint(module, tmp_path, monkeypatch):
    """Either changes the base's cached general answers or losses: a changed copy must not find the old entry."""
    from affiner.core import models
    from affiner.evaluation import general

    source = {"general": general, "models": models}[module]
    edited = tmp_path / f"{module}.py"
    edited.write_text(open(source.__file__).read() + "\n# changed\n")
    before = base_cache.code_fingerprint()
    monkeypatch.setattr(source, "__file__", str(edited))
    assert base_cache.code_fingerprint() != before
