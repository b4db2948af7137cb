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
from affiner.data.tokens import chars_per_token
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
    # French Excel's "CSV": semicolons between cells (the comma is its decimal mark), a BOM, CR LF line ends
    (tmp_path / "b.csv").write_bytes('\ufeffinstruction;input;output\r\nGive three colours.;;Red, green and blue.\r\n'
                                     "Translate.;bonjour;hello\r\n".encode("utf-8"))
    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "a.parquet")
    expected = to_examples(read_rows(str(tmp_path / "a.json")))
    assert [e.instruction for e in expected] == ["Give three colours.", "Translate."]
    assert expected[1].input == "bonjour" and expected[0].response == "Red, green and blue."
    for name in ("a.jsonl", "a.csv", "b.csv", "a.parquet"):
        got = to_examples(read_rows(str(tmp_path / name)))
        assert [(e.instruction, e.input, e.response) for e in got] == \
            [(e.instruction, e.input, e.response) for e in expected], name


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


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "lone-cr"])
def test_invalid_utf8_in_a_csv_names_its_line_whatever_ends_the_lines(tmp_path, ending):
    path = tmp_path / "latin1.csv"
    path.write_bytes(ending.join([b"question,answer", b"ok,ok", b"", b"caf\xe9,x", b""]))
    with pytest.raises(AffinerError, match=r"latin1.csv:4 is not valid UTF-8"):
        read_rows(str(path))


def test_a_csv_naming_a_column_twice_is_refused(tmp_path):
    path = tmp_path / "twice.csv"
    path.write_text("question,question,answer\nWhat?,Really?,Yes.\n", encoding="utf-8")
    with pytest.raises(AffinerError, match=r"twice.csv:1 names the column 'question' twice"):
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


def test_answers_to_train_on_that_open_a_new_turn_are_dropped_and_counted(tiny_gpt2):
    """Generation cuts an answer where a line opens a new turn of the template: training on such an answer
    would teach text nobody reads. The same words inside a sentence are an answer like any other."""
    tokenizer = load_tokenizer(str(tiny_gpt2))
    template = build_template("qa", tokenizer)
    examples = [Example("What is QUILT?", "A queue.\n### Question: and ZINNIA?", source="f:1"),
                Example("Quote the form.", "It reads ### Answer: here.", source="f:2")]
    ledger = Ledger()
    kept, _ = clean(examples, DataConfig(train="f", max_length=64), tokenizer, template, ledger, "train")
    assert [e.source for e in kept] == ["f:2"]
    assert ledger.counts() == {"answer starts a line with the template's '### Question:', where answers are cut": 1}
    held_out = Ledger()
    kept, _ = clean(examples, DataConfig(train="f", max_length=64), tokenizer, template, held_out, "test")
    assert len(kept) == 2  # a reference is read, never generated: nothing to cut


def test_answers_opening_a_new_turn_are_dropped_from_training_after_a_split_too(tiny_gpt2, tmp_path):
    """Without data.test, rows are cleaned as held out first, then split: the training side must still lose
    the answers generation would cut."""
    import json

    from affiner.data.pipeline import build

    rows = [{"question": f"What is item {i}?", "answer": f"Item {i}.\n### Question: and {i}?" if i % 2 else
             f"Item {i} is a thing."} for i in range(20)]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tokenizer = load_tokenizer(str(tiny_gpt2))
    prepared = build(DataConfig(train=str(source), max_length=64, test_size=4), tokenizer,
                     build_template("qa", tokenizer))
    assert prepared.train and not any("### Question:" in e.response for e in prepared.train)
    assert any(step["step"] == "new turns" and step["split"] == "train" for step in prepared.ledger.steps)


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
    with pytest.raises(AffinerError, match="cannot load dataset 'nobody/no-such-dataset'.*unreachable") as error:
        read_rows("nobody/no-such-dataset")
    # what can stand in for a dataset, not for a model
    assert "CSV or Parquet file" in str(error.value) and "gemma-3-270m" not in str(error.value)


# ---------------------------------------------------------------------------------------- strict readers


def test_quoted_csv_cells_keep_commas_line_breaks_and_quotes(tmp_path):
    path = tmp_path / "cells.csv"
    path.write_bytes(b'question,answer\r\n"Define, briefly:\r\nQUILT","Queue of ""Unified""\nIndex"\r\n\r\nq2,a2\r\n')
    rows = read_rows(str(path))
    assert rows == [({"question": "Define, briefly:\r\nQUILT", "answer": 'Queue of "Unified"\nIndex'}, f"{path}:2"),
                    ({"question": "q2", "answer": "a2"}, f"{path}:6")]  # each row named by its first line


def test_a_line_separator_inside_a_json_string_does_not_split_the_line(tmp_path):
    path = tmp_path / "seps.jsonl"
    path.write_text(json.dumps({"question": "a\u2028b", "answer": "c\x85d"}, ensure_ascii=False) + "\n"
                    + json.dumps({"question": "q", "answer": "a"}) + "\n", encoding="utf-8")
    rows = read_rows(str(path))
    assert [where for _, where in rows] == [f"{path}:1", f"{path}:2"] and rows[0][0]["question"] == "a\u2028b"


def test_columnar_nulls_are_empty_cells_and_optional_nulls_are_allowed(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"instruction": "q", "input": None, "output": None}]), tmp_path / "n.parquet")
    [example] = to_examples(read_rows(str(tmp_path / "n.parquet")))
    assert (example.input, example.response) == ("", "")  # then dropped as "empty answer"
    path = tmp_path / "n.jsonl"
    path.write_text('{"instruction": "q", "input": null, "output": "a", "group": null}\n', encoding="utf-8")
    [example] = to_examples(read_rows(str(path)))
    assert (example.input, example.group, example.response) == ("", "", "a")


def test_a_row_far_over_max_length_is_dropped_before_it_is_tokenised(tiny_gpt2):
    tokenizer = load_tokenizer(str(tiny_gpt2))
    template = build_template("qa", tokenizer)
    examples = [Example("What is QUILT?", "A queue.", source="f:1"), Example("Huge?", "x" * 1_000_000, source="f:2"),
                Example("Long?", "word " * 200, source="f:3")]
    ledger = Ledger()
    kept, lengths = clean(examples, DataConfig(train="f", max_length=64), tokenizer, template, ledger, "train")
    assert [e.source for e in kept] == ["f:1"]
    assert len(lengths) == 2  # the huge row never reached the tokenizer; the merely long one was measured
    assert ledger.counts() == {"over max_length=64 tokens (over 3328 characters, not tokenised)": 1,
                               "over max_length=64 tokens (prompt + answer)": 1}
    assert ledger.steps[0]["step"] == "characters" and ledger.steps[0]["kept"] == 2


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_no_token_stands_for_more_characters_than_chars_per_token(fixture, request):
    tokenizer = load_tokenizer(str(request.getfixturevalue(fixture)))
    per_token = chars_per_token(tokenizer)
    longest = max(tokenizer.get_vocab(), key=len)
    assert per_token == len(longest)
    texts = [longest * 50, "Instruction " * 40, " " * 500, "é" * 300, "ᾂ" * 100, "<|endoftext|>" * 30,
             "<start_of_turn>" * 30, "\n\n" * 200, "QUILT stands for Queue of Unified Index Lookup Tables. " * 20]
    for text in texts:
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) * per_token >= len(text), text[:30]


def test_chars_per_token_is_none_where_one_token_can_stand_for_any_length():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def wrap(model, normalizer=None, pre_tokenizer=None):
        raw = Tokenizer(model)
        raw.normalizer, raw.pre_tokenizer = normalizer, pre_tokenizer
        return PreTrainedTokenizerFast(tokenizer_object=raw)

    vocab, merges = {"<unk>": 0, "a": 1, "b": 2, "ab": 3}, [("a", "b")]
    bpe = lambda: models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)  # noqa: E731
    assert chars_per_token(wrap(bpe(), normalizers.Replace(" ", "▁"))) == 5  # "<unk>"
    assert chars_per_token(wrap(bpe(), normalizers.NFC())) == 4 * 5  # NFC composes up to 4 code points into one
    assert chars_per_token(wrap(bpe(), normalizers.Strip())) is None  # a million spaces become nothing
    assert chars_per_token(wrap(bpe(), None, pre_tokenizers.WhitespaceSplit())) is None
    assert chars_per_token(wrap(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True))) is None
    assert chars_per_token(wrap(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))) is None  # a word -> [UNK]


def test_nfc_composes_at_most_four_code_points_into_one():
    import sys
    import unicodedata

    characters = (chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF)
    longest = max(len(unicodedata.normalize("NFD", c)) for c in characters
                  if unicodedata.normalize("NFC", unicodedata.normalize("NFD", c)) == c)
    assert longest == 4


def test_csv_reads_as_the_csv_module_does(tmp_path):
    """What Excel or csv.writer produce (commas, quotes, line breaks, CR LF or CR line endings, empty cells)
    reads as the csv module reads it: the table written."""
    import csv
    import random

    rng = random.Random(0)
    for terminator in ("\r\n", "\n", "\r"):
        # csv.writer quotes a cell holding a character of its line ending: with CR endings, a bare LF is left
        # unquoted, and the file is then ambiguous (refused: "has 2 of the header's 3 fields").
        pieces = ["a", "b c", ",", '"', '""', "\r\n", " ", "é", "", "x,y", 'say "hi"']
        pieces += ["\n"] if "\n" in terminator else []
        table = [["question", "answer", "input"]] + [["".join(rng.choices(pieces, k=rng.randint(1, 6)))
                                                      for _ in range(3)] for _ in range(200)]
        path = tmp_path / "written.csv"
        with path.open("w", encoding="utf-8", newline="") as out:
            csv.writer(out, lineterminator=terminator).writerows(table)
        with path.open(encoding="utf-8", newline="") as stream:
            assert list(csv.reader(stream)) == table
        assert [[r[k] for k in table[0]] for r, _ in read_rows(str(path))] == table[1:], repr(terminator)


def test_a_column_that_looks_like_a_misspelt_field_is_noted(capsys):
    """`groupe` (French for group) would be ignored, and the paraphrases it groups split across train and test."""
    rows = [({"groupe": "g1", "question": "q", "answer": "a", "notes": "x"}, "vocab.csv:2")]
    assert to_examples(rows)[0].group == ""
    note = capsys.readouterr().err
    assert "vocab.csv has a column 'groupe' that affiner does not read" in note and "{group: groupe}" in note
    assert "notes" not in note
    to_examples([({"group": "g1", "question": "q", "answer": "a", "notes": "x"}, "vocab.csv:2")])
    assert capsys.readouterr().err == ""
