"""Data sources and formats, drops that are counted, splits, and the shipped glossary."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from affiner.synth import shipped as glossary
from affiner.core.config import DataConfig
from affiner.data.formats import to_examples
from affiner.data.ledger import Ledger
from affiner.data.pipeline import clean, split
from affiner.data.read import read_rows
from affiner.core.errors import AffinerError
from affiner.core.models import load_tokenizer
from affiner.core.templates import Example, build_template

ALPACA = [{"instruction": "Give three colours.", "input": "", "output": "Red, green and blue."},
          {"instruction": "Translate.", "input": "bonjour", "output": "hello"}]


def test_json_jsonl_csv_parquet_read_the_same_rows(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ALPACA), encoding="utf-8")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ALPACA) + "\n", encoding="utf-8")
    (tmp_path / "a.csv").write_text('instruction,input,output\nGive three colours.,,"Red, green and blue."\n'
                                    "Translate.,bonjour,hello\n", encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "a.parquet")
    expected = to_examples(read_rows(str(tmp_path / "a.json")))
    assert [e.instruction for e in expected] == ["Give three colours.", "Translate."]
    assert expected[1].input == "bonjour" and expected[0].response == "Red, green and blue."
    for suffix in ("jsonl", "csv", "parquet"):
        got = to_examples(read_rows(str(tmp_path / f"a.{suffix}")))
        assert [(e.instruction, e.input, e.response) for e in got] == \
            [(e.instruction, e.input, e.response) for e in expected], suffix


def test_qa_columns_are_mapped_and_detected(tmp_path):
    path = tmp_path / "glaive.csv"
    path.write_text("question,answer\nHow do I sort a list?,Use sorted().\n", encoding="utf-8")
    assert to_examples(read_rows(str(path)))[0] == Example(instruction="How do I sort a list?",
                                                           response="Use sorted().", source=f"{path}:2")
    renamed = tmp_path / "renamed.csv"
    renamed.write_text("prompt,completion\nHi,Hello\n", encoding="utf-8")
    mapped = to_examples(read_rows(str(renamed)), "alpaca", {"instruction": "prompt", "output": "completion"})
    assert (mapped[0].instruction, mapped[0].response) == ("Hi", "Hello")


def test_nested_glossary_layout_gives_one_example_per_conversation_with_reference_and_group():
    examples = to_examples(read_rows("embedded:glossary-train.json"))
    entries = glossary.shipped_glossary()
    assert len(examples) == len(entries) * len(glossary.TRAIN_QUESTIONS)
    first = examples[0]
    assert first.group == entries[0]["acronym"]
    assert first.reference == entries[0]["definition"]
    assert first.reference in first.response


def test_conversations_with_system_and_several_turns(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "QUILT?"},
                {"role": "assistant", "content": "Queue of Unified Index Lookup Tables"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n", encoding="utf-8")
    first, second = to_examples(read_rows(str(path)))
    assert first.history == (("system", "Be brief."),) and first.response == "Hello"
    assert second.history == (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"))
    assert second.instruction == "QUILT?"


@pytest.mark.parametrize("name,content,message", [
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n', r"bad.jsonl:2 is not valid JSON"),
    ("bad.json", '[{"instruction": "a",\n "output": }]', r"bad.json:2 is not valid JSON"),
    ("missing.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "answer": "b"}\n', r"missing.jsonl:2 has no 'output'"),
    ("wide.csv", "question,answer\nq,a,extra\n", r"wide.csv:2 has more fields than the header"),
    ("roles.jsonl", '{"messages": [{"role": "bot", "content": "x"}]}\n', r"roles.jsonl:1 message 1 has role 'bot'"),
    ("noanswer.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', r"no assistant message"),
    ("scalar.json", '"just a string"', r"must hold a JSON list"),
])
def test_bad_files_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(AffinerError, match=message):
        to_examples(read_rows(str(path)))


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "ok", "answer": "ok"}\n{"question": "caf\xe9", "answer": "x"}\n')
    with pytest.raises(AffinerError, match=r"latin1.jsonl:2 is not valid UTF-8"):
        read_rows(str(path))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(AffinerError, match="does not exist"):
        read_rows(str(tmp_path / "nope.jsonl"))
    path = tmp_path / "odd.jsonl"
    path.write_text('{"text": "hello"}\n', encoding="utf-8")
    with pytest.raises(AffinerError, match="cannot tell the format.*data.columns"):
        to_examples(read_rows(str(path)))


def test_empty_and_too_long_rows_are_counted_and_dropped(tiny_gpt2):
    tokenizer = load_tokenizer(str(tiny_gpt2))
    template = build_template("qa", tokenizer)
    examples = [Example("What is QUILT?", "A queue.", source="f:1"), Example("   ", "orphan answer", source="f:2"),
                Example("Empty answer?", "  ", source="f:3"), Example("Long?", "word " * 200, source="f:4")]
    ledger = Ledger()
    kept, _ = clean(examples, DataConfig(train="f", max_length=64), tokenizer, template, ledger, "train")
    assert len(kept) == 1 and ledger.steps[0]["in"] == 4 and ledger.steps[-1]["kept"] == 1
    assert ledger.counts() == {"empty question": 1, "empty answer": 1,
                               "over max_length=64 tokens (prompt + answer)": 1}
    assert [row.source for row, _ in ledger.dropped[:2]] == ["f:2", "f:3"]
    assert "1 empty question (f:2)" in ledger.describe() and "1 empty answer (f:3)" in ledger.describe()


def test_split_is_seeded_and_keeps_groups_on_one_side():
    examples = to_examples(read_rows("embedded:glossary-train.json"))
    train, test = split(examples, 0.2, seed=42)
    assert not {e.group for e in train} & {e.group for e in test}
    assert len(train) + len(test) == len(examples)
    assert split(examples, 0.2, seed=42) == (train, test)
    assert split(examples, 0.2, seed=7) != (train, test)
    with pytest.raises(AffinerError, match="leaves nothing to train on"):
        split(examples[:3], 5, seed=0)


def test_shipped_glossary_files_are_the_expansion_of_the_glossary():
    from importlib import resources

    for name, records in glossary.build_shipped().items():
        shipped = (resources.files("affiner") / "resources" / name).read_text(encoding="utf-8")
        assert shipped == glossary.render(records), f"{name} is stale: run python -m affiner.synth.shipped"


def test_held_out_questions_are_phrased_differently_from_training_ones():
    train = {e.instruction for e in to_examples(read_rows("embedded:glossary-train.json"))}
    test = to_examples(read_rows("embedded:glossary-test.json"))
    assert len(test) >= 60
    assert not train & {e.instruction for e in test}
    assert {e.group for e in test} == {g["acronym"] for g in glossary.shipped_glossary()}


def test_embedded_instruction_pairs_are_alpaca_shaped():
    examples = to_examples(read_rows("embedded:instructions.json"))
    assert len(examples) >= 30
    assert all(e.instruction.strip() and e.response.strip() for e in examples)


def test_unreachable_hub_dataset_is_a_clear_error(offline_hub):
    with pytest.raises(AffinerError, match="cannot load dataset 'nobody/no-such-dataset'.*unreachable"):
        read_rows("nobody/no-such-dataset")
