"""affiner prepare: each filter, batched token counts equal to training's, grouped splits, the prepared
folder (files, card, fingerprint) and train/evaluate reading it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_config

from affiner import cli
from affiner.core.config import load_config
from affiner.data.formats import to_examples
from affiner.data.read import read_rows
from affiner.data.tokens import token_lengths
from affiner.core.models import load_tokenizer
from affiner.data.pipeline import build
from affiner.data.filters import (
    drop_by_pattern,
    drop_duplicates,
    drop_empty,
    drop_other_languages,
    drop_overlap,
    normalized,
)
from affiner.core.templates import Example, build_template, encode_prompt, encode_response


def ex(instruction: str, response: str = "an answer", **fields) -> Example:
    return Example(instruction=instruction, response=response, **fields)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def alpaca_rows(n: int, **extra) -> list[dict]:
    return [{"instruction": f"Name item number {i}.", "input": "", "output": f"Item {i} is a thing.", **extra}
            for i in range(n)]


def prepare(tmp_path: Path, base: Path, source: Path, output: Path | None = None, **data) -> tuple[Path, int]:
    config = write_config(tmp_path / "cfg", base, source, data={"template": "alpaca", "max_length": 96,
                                                                "test_size": 0.25, **data})
    output = output or tmp_path / "prepared"
    try:
        cli.main(["prepare", str(config), "--output", str(output)])
    except SystemExit as exc:
        return output, exc.code
    return output, 0


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------- filters


def test_normalized_ignores_case_spacing_and_punctuation_but_keeps_words():
    assert normalized("Hello,  World!") == normalized("hello world") == "hello world"
    assert normalized("Qu'est-ce que l’ADN ?") == normalized("quest-ce que ladn")  # apostrophes of both kinds
    assert normalized("hello world") != normalized("hello word")


def test_empty_questions_and_answers_are_dropped_with_their_reason():
    kept, dropped = drop_empty([ex("q", "a"), ex("  ", "a"), ex("q", " \n")])
    assert [e.instruction for e in kept] == ["q"]
    assert [reason for _, reason in dropped] == ["empty question", "empty answer"]


def test_duplicates_exact_and_normalized():
    rows = [ex("What is X?", "X is Y."), ex("What is X?", "X is Y."), ex("what is  x", "x is y"),
            ex("What is X?", "Something else."), ex("Hi", "X is Y.", history=(("user", "a"), ("assistant", "b")))]
    kept, dropped = drop_duplicates(rows, "normalized")
    assert len(kept) == 3  # a different answer, or a different history, is not a duplicate
    assert [reason for _, reason in dropped] == ["exact duplicate", "near duplicate (case, spaces, punctuation)"]
    kept, dropped = drop_duplicates(rows, "exact")
    assert len(kept) == 4 and [r for _, r in dropped] == ["exact duplicate"]
    assert drop_duplicates(rows, "none") == (rows, [])


def test_patterns_keep_and_drop():
    rows = [ex("Write a poem", "As an AI language model, I cannot."), ex("Write code", "def f(): pass"),
            ex("Cook", "Boil water.")]
    kept, dropped = drop_by_pattern(rows, keep=r"(?i)write", drop=r"As an AI")
    assert [e.instruction for e in kept] == ["Write code"]
    assert sorted(r.split()[0] for _, r in dropped) == ["does", "matches"]


def test_language_filter_keeps_the_listed_languages():
    rows = [ex("What is the capital of France?", "The capital of France is Paris, a large city."),
            ex("Quelle est la capitale de la France ?", "La capitale de la France est Paris, une grande ville."),
            ex("Was ist die Hauptstadt von Frankreich?", "Die Hauptstadt von Frankreich ist Paris.")]
    kept, dropped = drop_other_languages(rows, ["en", "fr"])
    assert [e.instruction[:4] for e in kept] == ["What", "Quel"]
    assert dropped[0][1] == "language de not in en, fr"


def test_overlap_drops_test_questions_seen_in_training():
    train = [ex("What is X?", "X."), ex("What is Y?", "Y.")]
    test = [ex("what is x", "another answer"), ex("What is Z?", "Z.")]
    kept, dropped = drop_overlap(test, train)
    assert [e.instruction for e in kept] == ["What is Z?"]
    assert dropped[0][1] == "question also in train"


# ---------------------------------------------------------------------------------------- token counts


@pytest.mark.parametrize("template_name", ["alpaca", "qa", "instruction"])
@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
def test_batched_token_counts_equal_the_training_encoder(request, model, template_name):
    tokenizer = load_tokenizer(str(request.getfixturevalue(model)))
    examples = [ex("Name a colour.", "Blue."), ex("Add the numbers", "5", input="2 and 3"),
                ex("Éviter les accents ?", "Non, jamais : « é », « à »."), ex("x " * 50, "y " * 30)]
    for system_prompt in (None, "You are terse."):
        template = build_template(template_name, tokenizer, system_prompt)
        expected = [len(encode_prompt(template, tokenizer, e)) + len(encode_response(template, tokenizer, e))
                    for e in examples]
        assert token_lengths(examples, template, tokenizer, batch_size=3) == expected


def test_batched_token_counts_with_a_chat_template(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    template = build_template("chat", tokenizer, "Be brief.")
    examples = [ex("Hi", "Hello."), ex("And?", "Done.", history=(("user", "Hi"), ("assistant", "Hello.")))]
    expected = [len(encode_prompt(template, tokenizer, e)) + len(encode_response(template, tokenizer, e))
                for e in examples]
    assert token_lengths(examples, template, tokenizer) == expected


# ---------------------------------------------------------------------------------------- splits


def test_grouped_split_keeps_every_acronym_on_one_side(tiny_gpt2, tmp_path):
    """The shipped glossary: 8 phrasings per acronym; a random row split would leak every acronym."""
    config = load_config("quickstart", ["data.test=null", "data.test_size=0.3", "data.template=qa", "data.seed=7"])
    tokenizer = load_tokenizer(str(tiny_gpt2))
    prepared = build(config.data, tokenizer, build_template("qa", tokenizer))
    train_groups = {e.group for e in prepared.train}
    test_groups = {e.group for e in prepared.test}
    assert len(train_groups) == 21 and len(test_groups) == 9
    assert not train_groups & test_groups
    assert prepared.info["groups"]["on_both_sides"] == 0
    # and through the written files, as train will read them
    output, code = prepare(tmp_path, tiny_gpt2, Path("embedded:glossary-train.json"), template="qa", test_size=0.3,
                           seed=7)
    assert code == 0
    written = {side: {r["group"] for r in lines(output / f"{side}.jsonl")} for side in ("train", "test")}
    assert written["train"] == train_groups and written["test"] == test_groups


def test_a_mapped_column_groups_plain_rows(tiny_gpt2, tmp_path):
    rows = [{"q": f"Tell me about {topic}, variant {v}.", "a": f"{topic} is nice.", "topic": topic}
            for topic in ("cats", "dogs", "fish", "birds", "frogs") for v in range(4)]
    source = write_jsonl(tmp_path / "topics.jsonl", rows)
    output, code = prepare(tmp_path, tiny_gpt2, source, format="qa", test_size=2,
                           columns={"instruction": "q", "question": "q", "answer": "a", "group": "topic"})
    assert code == 0
    train, test = (lines(output / f"{side}.jsonl") for side in ("train", "test"))
    assert len(test) == 8 and len(train) == 12
    assert not {r["group"] for r in train} & {r["group"] for r in test}


# ---------------------------------------------------------------------------------------- the prepared folder


def test_prepare_writes_clean_measured_files(tiny_gpt2, tmp_path, capsys):
    rows = alpaca_rows(40)
    rows += [rows[0], {**rows[1], "output": rows[1]["output"].upper()},  # exact and near duplicates
             {"instruction": "Empty", "input": "", "output": "  "},
             {"instruction": "Long", "input": "", "output": "word " * 90},
             {"instruction": "Longer than max_length " + "tokens " * 30, "input": "", "output": "ok"}]
    source = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    output, code = prepare(tmp_path, tiny_gpt2, source, max_response_words=80)
    assert code == 0
    manifest = json.loads((output / "prepared.json").read_text())
    steps = {(s["split"], s["step"]): s for s in manifest["steps"]}
    assert steps[("train", "read")]["in"] == 45
    assert steps[("train", "duplicates")]["dropped"] == {"exact duplicate": 1,
                                                         "near duplicate (case, spaces, punctuation)": 1}
    assert steps[("train", "empty fields")]["dropped"] == {"empty answer": 1}
    assert steps[("train", "answer words")]["dropped"] == {"answer over 80 words": 1}
    assert steps[("train", "tokens")]["dropped"] == {"over max_length=96 tokens (prompt + answer)": 1}
    train, test = lines(output / "train.jsonl"), lines(output / "test.jsonl")
    assert len(train) + len(test) == 40 and len(test) == 10
    dropped = lines(output / "dropped.jsonl")
    assert sorted(r["reason"] for r in dropped) == sorted(["exact duplicate", "empty answer", "answer over 80 words",
                                                           "near duplicate (case, spaces, punctuation)",
                                                           "over max_length=96 tokens (prompt + answer)"])
    assert all(r["origin"].startswith(str(source)) for r in dropped)  # each points at its source line
    # measured on each side of the split, the training side before its token filter
    assert manifest["token_lengths"]["train"]["max"] > 96 and manifest["over_max_length"] == {"train": 1, "test": 0}
    assert set(manifest["token_lengths"]["train"]) == {"p50", "p90", "p95", "p99", "max"}
    assert (output / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (output / "data_card.md").read_text()
    assert "| train | duplicates | 44 | 2 | 42 |" in card and "![token lengths](lengths.png)" in card
    assert "--set data.train=" in capsys.readouterr().out


def test_train_and_evaluate_read_a_prepared_folder_and_refuse_an_edited_one(tiny_gpt2, tmp_path):
    source = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(12))
    output, code = prepare(tmp_path, tiny_gpt2, source, test_size=3)
    assert code == 0
    config = write_config(tmp_path / "train", tiny_gpt2, output, data={"template": "alpaca", "max_length": 96})
    cli.main(["train", str(config)])
    run = next((tmp_path / "train" / "runs").iterdir())
    data = json.loads((run / "data.json").read_text())
    assert data["train"]["examples"] == 9 and data["test"]["examples"] == 3
    assert data["test"]["source"] == str(output)  # the prepared test split, not a new split of train
    manifest = json.loads((output / "prepared.json").read_text())
    assert data["train"]["prepared"]["sha256"] == manifest["files"]["train.jsonl"]["sha256"]
    held_out = json.loads((run / "test_examples.json").read_text())
    assert [e["instruction"] for e in held_out] == [r["instruction"] for r in lines(output / "test.jsonl")]
    assert len(to_examples(read_rows(str(output), "test"))) == 3

    with open(output / "train.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"instruction": "sneaked in", "input": "", "output": "after prepare"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(config)])
    assert exit_info.value.code == 2


def test_a_folder_prepared_from_qa_rows_with_mapped_columns_is_read_back_by_the_same_config(tiny_gpt2, tmp_path):
    """The glaive recipes' way (format qa): prepare, then train with --set data.train=FOLDER. The prepared files
    are affiner's own rows, read as such whatever the config's format and column names."""
    source = write_jsonl(tmp_path / "faq.jsonl", [{"Q": f"What is item {i}?", "A": f"Item {i} is a thing."}
                                                  for i in range(12)])
    mapped = {"format": "qa", "template": "qa", "columns": {"question": "Q", "answer": "A"}}
    output, code = prepare(tmp_path, tiny_gpt2, source, test_size=3, **mapped)
    assert code == 0
    tokenizer = load_tokenizer(str(tiny_gpt2))
    config = load_config(str(write_config(tmp_path / "train", tiny_gpt2, output,
                                          data={"max_length": 96, **mapped})))
    prepared = build(config.data, tokenizer, build_template("qa", tokenizer))
    assert [e.instruction for e in prepared.test] == [r["instruction"] for r in lines(output / "test.jsonl")]
    assert len(prepared.train) == 9 and prepared.train[0].response.startswith("Item ")


def test_existing_output_is_refused_untouched_and_replaced_only_when_asked(tiny_gpt2, tmp_path, capsys):
    source = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(12))
    output, code = prepare(tmp_path, tiny_gpt2, source)
    assert code == 0
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    write_jsonl(source, alpaca_rows(20))
    _, code = prepare(tmp_path, tiny_gpt2, source, output=output)
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    config = tmp_path / "cfg" / "config.yaml"
    cli.main(["prepare", str(config), "--output", str(output), "--overwrite"])
    assert len(lines(output / "train.jsonl")) + len(lines(output / "test.jsonl")) == 20
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left over


def test_overwrite_never_replaces_a_folder_prepare_did_not_write(tiny_gpt2, tmp_path, capsys):
    source = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(12))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    config = write_config(tmp_path / "cfg", tiny_gpt2, source, data={"template": "alpaca"})
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prepare", str(config), "--output", str(precious), "--overwrite"])
    assert exit_info.value.code == 2 and "not written by affiner prepare" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "mine"


def test_the_commands_prepare_advises_train_on_the_folder_even_with_spaces_in_the_paths(tiny_gpt2, tmp_path, capsys):
    import shlex

    from affiner.core.config import load_config

    source = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(12))
    output, code = prepare(tmp_path / "my work", tiny_gpt2, source, output=tmp_path / "my data")
    assert code == 0
    advised = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("next: "))
    card = (output / "data_card.md").read_text()
    in_card = next(line for line in card.splitlines() if line.startswith("affiner train "))
    for command in (advised.removeprefix("next: "), in_card.replace("<this folder>", shlex.quote(str(output)))):
        words = shlex.split(command)
        assert words[:2] == ["affiner", "train"] and words[3::2] == ["--set", "--set"]
        config = load_config(words[2], words[4::2])
        assert config.data.train == config.data.test == str(output)
