"""A catalogue of bad inputs to `affiner prepare`: each one either stops with a one-paragraph error
(exit 2, no traceback, naming the file, line or key) or is dropped and counted with its reason. Nothing
already written is lost: the inputs, an earlier prepared folder and the output's folder stay as they were.
The glossary generator's catalogue is in test_generate.py."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from affiner import cli

GOOD = [{"instruction": f"Name item {i}.", "input": "", "output": f"Item {i} is a thing."} for i in range(8)]


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


@dataclass
class Case:
    id: str
    files: dict[str, str | bytes]  # written into the input folder; "train" names the training source
    data: dict = field(default_factory=dict)  # data: section overrides; "{in}" is the input folder
    error: str | None = None  # what the message must say
    drop: str | None = None  # or: the reason counted in prepared.json and dropped.jsonl
    top: dict = field(default_factory=dict)  # other config sections
    fixture: str | None = None


def convo(*messages: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in messages]}


def csv_text(rows: list[dict]) -> str:
    """Instruction and output columns, cells written as they are (quote them in the rows)."""
    return "instruction,output\n" + "".join(f"{r['instruction']},{r['output']}\n" for r in rows)


def parquet(rows: list[dict]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


# tiny GPT-2's longest token is "<|endoftext|>" (13 characters): no row over 96 x 13 characters fits in
# max_length=96 tokens; rows up to 4 times that are still tokenised, so that the histogram shows them.
# Before the split, a row is measured against the model's context (256 positions for the tiny GPT-2): a held-out
# row may be longer than data.max_length, a training limit, but not than what the model can read.
CERTAINLY_TOO_LONG = "over the model's context (256 tokens) (over 13312 characters, not tokenised)"


ERRORS = [
    Case("invalid-json", {"d.json": '[{"instruction": "a", "output": "b"},\n {"instruction": oops}\n]'},
         error="d.json:2 is not valid JSON"),
    Case("invalid-jsonl-line", {"d.jsonl": jsonl(GOOD[:2]) + '{"instruction": "x", "output": }\n'},
         error="d.jsonl:3 is not valid JSON"),
    Case("jsonl-line-cut-short", {"d.jsonl": jsonl(GOOD[:2]) + '{"instruction": "x", "output": "y"\n'},
         error="d.jsonl:3 is not valid JSON: Expecting ',' delimiter (column 35)"),  # its end, not "column 1"
    Case("latin-1-bytes", {"d.jsonl": jsonl(GOOD[:2]).encode() + '{"instruction": "café", "output": "x"}\n'
                                                                 .encode("latin-1")},
         error="d.jsonl:3 is not valid UTF-8"),
    Case("csv-extra-field", {"d.csv": "instruction,output\nq1,a1\nq2,a2,surplus\n"},
         error="d.csv:3 has more fields than the header"),
    Case("csv-empty", {"d.csv": ""}, error="d.csv is empty: a CSV file needs a header row"),
    Case("missing-column", {"d.jsonl": jsonl([{"instruction": "q", "answer": "a"}])}, data={"format": "alpaca"},
         error="has no 'output' field"),
    Case("mapping-to-absent-column", {"d.jsonl": jsonl([{"prompt": "q", "answer": "a"}])},
         data={"format": "alpaca", "columns": {"instruction": "prompt", "output": "reply"}},
         error="data.columns.output names the column 'reply', which no row of the data has"),
    Case("column-name-misspelt", {"d.jsonl": jsonl(GOOD)}, data={"columns": {"gruop": "topic"}},
         error="data.columns: 'gruop' is no field affiner reads, did you mean 'group'?"),
    Case("optional-column-misspelt", {"d.jsonl": jsonl([{**r, "topic": "t"} for r in GOOD])},
         data={"columns": {"group": "topicz"}}, error="data.columns.group names the column 'topicz'"),
    Case("key-given-twice", {"d.jsonl": jsonl(GOOD[:2]) + '{"instruction": "q", "output": "real", "output": "junk"}\n'},
         error="d.jsonl:3 gives the key 'output' twice in one object"),
    Case("key-given-twice-in-a-json-file", {"d.json": '[{"instruction": "q", "output": "real", "output": "junk"}]'},
         error="d.json gives the key 'output' twice in one object"),
    Case("lone-surrogate", {"d.jsonl": jsonl(GOOD[:2]) + '{"instruction": "q \\ud800", "output": "a"}\n'},
         error="d.jsonl:3 'instruction' holds a lone UTF-16 surrogate"),
    Case("data-path-is-a-plain-folder", {"d.jsonl": jsonl(GOOD)}, data={"train": "{in}"},
         error="is a folder, and not one written by affiner prepare"),
    Case("prepared-manifest-damaged", {"p/prepared.json": '{"files": ', "p/train.jsonl": jsonl(GOOD)},
         data={"train": "{in}/p"}, error="p/prepared.json is damaged"),
    Case("unsupported-suffix", {"d.txt": "q\ta\n"}, error="unsupported type '.txt'"),
    Case("missing-file", {}, data={"train": "{in}/nowhere.jsonl"}, error="nowhere.jsonl does not exist"),
    Case("json-not-a-list", {"d.json": "42"}, error="must hold a JSON list of records"),
    Case("record-not-an-object", {"d.json": '["just a string"]'}, error="d.json item 1 must be a JSON object"),
    Case("unknown-role", {"d.jsonl": jsonl([convo(("user", "hi"), ("bot", "hello"))])},
         error="has role 'bot'"),
    Case("assistant-first", {"d.jsonl": jsonl([convo(("assistant", "hello"), ("user", "hi"), ("assistant", "x"))])},
         error="assistant message 1 must follow a user message"),
    Case("no-assistant", {"d.jsonl": jsonl([convo(("user", "hi"))])}, error="has no assistant message"),
    Case("answer-not-text", {"d.jsonl": jsonl([{"instruction": "q", "output": {"text": "a"}}])},
         error="'output' must be text"),
    Case("damaged-parquet", {"d.parquet": b"PAR1 this is not parquet"}, error="is not a readable Parquet file"),
    Case("no-rows", {"d.jsonl": "\n\n"}, error="holds no rows"),
    Case("test-file-without-rows", {"d.jsonl": jsonl(GOOD), "t.csv": "instruction,output\n"},
         data={"test": "{in}/t.csv"}, error="t.csv (data.test) holds no rows: the held-out questions need at least one"),
    Case("nothing-survives", {"d.jsonl": jsonl([{"instruction": "q", "output": " "}, {"instruction": "", "output": "a"}])},
         error="survives cleaning (1 empty answer; 1 empty question)"),
    Case("invalid-regex", {"d.jsonl": jsonl(GOOD)}, data={"drop_matching": "(unclosed"},
         error="data.drop_matching: is not a valid regular expression"),
    Case("unknown-language", {"d.jsonl": jsonl(GOOD)}, data={"languages": ["en", "klingon"]},
         error="data.languages: klingon is not a language code"),
    Case("test-size-too-large", {"d.jsonl": jsonl(GOOD[:3])}, data={"test_size": 3},
         error="leaves nothing to train on"),
    Case("typo-in-key", {"d.jsonl": jsonl(GOOD)}, data={"max_lenght": 64},
         error="data.max_lenght: unknown key, did you mean 'max_length'?"),
    Case("unknown-format", {"d.jsonl": jsonl([{"foo": "q", "bar": "a"}])},
         error="cannot tell the format of"),
    Case("multi-turn-with-text-template",
         {"d.jsonl": jsonl([convo(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))])},
         error="multi-turn conversation, which the 'alpaca' template cannot express"),
    Case("test-file-broken", {"d.jsonl": jsonl(GOOD), "t.jsonl": "{broken\n"}, data={"test": "{in}/t.jsonl"},
         error="t.jsonl:1 is not valid JSON"),
    Case("hub-unreachable", {}, data={"train": "someone/some-dataset"}, fixture="offline_hub",
         error="someone/some-dataset"),
    Case("csv-quote-never-closed", {"d.csv": 'instruction,output\nq1,a1\nq2,"a2 never closed\nq3,a3\nq4,a4\n'},
         error="d.csv:3: the quote opened on line 3 is never closed"),
    Case("csv-quote-never-closed-after-a-multi-line-cell",
         {"d.csv": 'instruction,output\n"two\nlines",a1\nq2,a2\nq3,"open\nq4,a4\n'},
         error="the quote opened on line 5 is never closed"),
    Case("csv-text-after-closing-quote", {"d.csv": 'instruction,output\nq1,a1\nq2,"a2" and more\n'},
         error="d.csv:3 is not valid CSV: a quoted cell has text after its closing quote"),
    Case("csv-quote-never-closed-before-a-quoted-cell",  # the next line's opening quote closes it: name both lines
         {"d.csv": 'instruction,output\nq1,"a1 never closed\nq2,"a2"\n'},
         error="d.csv:3 is not valid CSV: a quoted cell has text after its closing quote. The cell's quote opened "
               "on line 2"),
    Case("semicolon-csv-cell-with-a-semicolon", {"d.csv": "instruction;output\nq1;a1\nq2;a2; and more\n"},
         error="d.csv:3 has more fields than the header (instruction, output); quote a cell that holds the separator"),
    Case("csv-unquoted-line-break", {"d.csv": "instruction,output\nq1,first line\nsecond line\n"},
         error="d.csv:3 has 1 of the header's 2 fields"),
    Case("number-cell", {"d.jsonl": jsonl([*GOOD[:2], {"instruction": "q", "output": 42}])},
         error="""d.jsonl:3: 'output' must be text, not the number 42: quote it ("42")"""),
    Case("boolean-cell", {"d.jsonl": jsonl([{"instruction": True, "output": "a"}])},
         error="d.jsonl:1: 'instruction' must be text, not true"),
    Case("nan-cell", {"d.jsonl": '{"instruction": "q", "output": NaN}\n'},
         error="d.jsonl:1: 'output' must be text, not NaN"),
    Case("null-answer", {"d.jsonl": jsonl([*GOOD, {"instruction": "q", "output": None}])},
         error="""d.jsonl:9: 'output' must be text, not null: write "" for an empty text"""),
    Case("list-role", {"d.jsonl": jsonl([{"messages": [{"role": ["user"], "content": "hi"}]}])},
         error="d.jsonl:1 message 1 has role ['user']"),
    Case("multi-part-content", {"d.jsonl": jsonl([{"messages": [{"role": "user", "content": "hi"}, {
        "role": "assistant", "content": [{"type": "text", "text": "hello"}]}]}])},
         error="d.jsonl:1 message 2: 'content' must be text, not a list"),
    Case("jsonl-nested-too-deep", {"d.jsonl": jsonl(GOOD[:2]) + "[" * 100_000 + "\n"},
         error="d.jsonl:3 nests lists or objects too deep to read"),
    Case("json-nested-too-deep",
         {"d.json": '[{"instruction": "a", "output": "b"},\n' + "[" * 100_000 + "]" * 100_000 + "]"},
         error="d.json:2 nests lists or objects too deep to read"),
    Case("number-too-long-to-convert", {"d.jsonl": '{"instruction": "q", "output": ' + "9" * 5000 + "}\n"},
         error="d.jsonl:1 holds a number of more than 4300 digits"),
    Case("max-length-too-small", {"d.jsonl": jsonl(GOOD)}, data={"max_length": 4},
         error="data.max_length: input should be greater than or equal to 8"),
]

DROPS = [
    Case("empty-answer", {"d.jsonl": jsonl([*GOOD, {"instruction": "q", "output": ""}])}, drop="empty answer"),
    Case("null-answer-in-parquet", {"d.parquet": parquet([*GOOD, {"instruction": "q", "input": "", "output": None}])},
         drop="empty answer"),  # a columnar table writes an empty cell as null
    Case("blank-question", {"d.jsonl": jsonl([*GOOD, {"instruction": " \t", "output": "a"}])}, drop="empty question"),
    Case("exact-duplicate", {"d.jsonl": jsonl([*GOOD, GOOD[0]])}, drop="exact duplicate"),
    Case("near-duplicate", {"d.jsonl": jsonl([*GOOD, {"instruction": "NAME  ITEM 0", "output": "item 0 is a thing"}])},
         drop="near duplicate (case, spaces, punctuation)"),
    Case("long-answer", {"d.jsonl": jsonl([*GOOD, {"instruction": "q", "output": "word " * 9}])},
         data={"max_response_words": 8}, drop="answer over 8 words"),
    Case("prompt-over-the-context", {"d.jsonl": jsonl([*GOOD, {"instruction": "token " * 200, "output": "a"}])},
         drop="prompt over the model's context (256 tokens)"),
    Case("train-row-over-max-length", {"d.jsonl": jsonl(GOOD), "t.jsonl": jsonl([{"instruction": "new", "output": "x"}]),
                                        "long.jsonl": jsonl([*GOOD, {"instruction": "token " * 100, "output": "a"}])},
         data={"train": "{in}/long.jsonl", "test": "{in}/t.jsonl"}, drop="over max_length=96 tokens (prompt + answer)"),
    Case("test-overlaps-train", {"d.jsonl": jsonl(GOOD), "t.jsonl": jsonl([GOOD[0], {"instruction": "new", "output": "x"}])},
         data={"test": "{in}/t.jsonl"}, drop="question also in train"),
    Case("drop-pattern", {"d.jsonl": jsonl([*GOOD, {"instruction": "q", "output": "As an AI language model, no."}])},
         data={"drop_matching": "As an AI"}, drop="matches drop_matching 'As an AI'"),
    Case("other-language", {"d.jsonl": jsonl([*[{"instruction": f"What is the colour of item {i}?",
                                                 "output": f"The colour of item {i} is a lovely shade of blue."}
                                                for i in range(6)],
                                              {"instruction": "Wie heißt die Hauptstadt von Deutschland?",
                                               "output": "Die Hauptstadt von Deutschland ist Berlin."}])},
         data={"languages": ["en"]}, drop="language de not in en"),
    Case("row-far-over-max-length", {"d.jsonl": jsonl([*GOOD, {"instruction": "q", "output": "x" * 600_000}])},
         drop=CERTAINLY_TOO_LONG),
    Case("csv-cell-far-over-max-length", {"d.csv": csv_text(GOOD) + "q," + "x" * 600_000 + "\n"},
         drop=CERTAINLY_TOO_LONG),
    Case("csv-multi-line-cell-is-one-row",  # each quoted answer spans two lines and holds quotes
         {"d.csv": csv_text([{**r, "output": f'"{r["output"]}\nand a ""quoted"" line"'} for r in GOOD]) + 'q,""\n'},
         drop="empty answer"),
    Case("beyond-max-rows", {"d.jsonl": jsonl(GOOD)}, data={"max_rows": 7}, drop="beyond max_rows=7"),
]


def run_prepare(case: Case, tmp_path: Path, base: Path, request) -> tuple[int, str, str, Path]:
    if case.fixture:
        request.getfixturevalue(case.fixture)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, content in case.files.items():
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        (inputs / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    train = next((f"{{in}}/{n}" for n in case.files if n.startswith("d.")), "{in}/d.jsonl")
    data = {"train": train, "template": "alpaca", "max_length": 96, "test_size": 2, **case.data}
    data = {k: v.replace("{in}", str(inputs)) if isinstance(v, str) else v for k, v in data.items()}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"name": "catalogue", "model": {"base": str(base)}, "data": data, **case.top}))
    output = tmp_path / "out" / "prepared"
    try:
        cli.main(["prepare", str(config), "--output", str(output)])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, inputs, output


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ERRORS, ids=[c.id for c in ERRORS])
def test_bad_input_stops_with_a_clear_error_and_writes_nothing(case, tmp_path, tiny_gpt2, request, capsys):
    earlier = tmp_path / "out" / "earlier"  # an earlier prepared folder beside the output: must survive
    earlier.mkdir(parents=True)
    (earlier / "train.jsonl").write_text("kept\n")
    inputs_before = {name: content for name, content in case.files.items()}
    code, inputs, output = run_prepare(case, tmp_path, tiny_gpt2, request)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("affiner prepare: error: ") and "Traceback" not in err
    assert "\n" not in err.strip(), "one paragraph"
    assert case.error in err
    assert not output.exists()
    assert sorted(p.name for p in output.parent.iterdir()) == ["earlier"]  # no half-written or staging folder
    assert (earlier / "train.jsonl").read_text() == "kept\n"
    for name, content in inputs_before.items():
        expected = content if isinstance(content, bytes) else content.encode("utf-8")
        assert (inputs / name).read_bytes() == expected


@pytest.mark.parametrize("case", DROPS, ids=[c.id for c in DROPS])
def test_bad_row_is_dropped_and_counted_with_its_reason(case, tmp_path, tiny_gpt2, request):
    code, _, output = run_prepare(case, tmp_path, tiny_gpt2, request)
    assert code == 0
    manifest = json.loads((output / "prepared.json").read_text())
    counted = {reason: n for step in manifest["steps"] for reason, n in step["dropped"].items()}
    assert counted == {case.drop: 1}
    dropped = [json.loads(line) for line in (output / "dropped.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in dropped] == [case.drop]
    assert case.drop in (output / "data_card.md").read_text()
    if case.drop == CERTAINLY_TOO_LONG:  # dropped by its length alone, never tokenised
        assert all(side["max"] <= 96 for side in manifest["token_lengths"].values())
        assert set(manifest["over_max_length"].values()) == {0}


def test_an_existing_output_is_refused_and_left_untouched(tmp_path, tiny_gpt2, request, capsys):
    case = Case("output-exists", {"d.jsonl": jsonl(GOOD)})
    output = tmp_path / "out" / "prepared"
    output.mkdir(parents=True)
    (output / "train.jsonl").write_text("earlier work\n")
    before = snapshot(output)
    code, _, _ = run_prepare(case, tmp_path, tiny_gpt2, request)
    err = capsys.readouterr().err
    assert code == 2 and "was not written by affiner prepare" in err and "Traceback" not in err
    assert "--overwrite" not in err  # it would be refused too: a user's own folder is never replaced
    assert snapshot(output) == before


def test_an_empty_output_folder_is_written_into(tmp_path, tiny_gpt2, request):
    (tmp_path / "out" / "prepared").mkdir(parents=True)
    code, _, output = run_prepare(Case("empty-output", {"d.jsonl": jsonl(GOOD)}), tmp_path, tiny_gpt2, request)
    assert code == 0 and (output / "prepared.json").is_file()


def test_an_output_that_is_a_link_is_replaced_where_it_leads_and_stays_a_link(tmp_path, tiny_gpt2, request, capsys):
    case = Case("linked-output", {"d.jsonl": jsonl(GOOD)})
    code, inputs, output = run_prepare(case, tmp_path, tiny_gpt2, request)
    assert code == 0
    real = output.with_name("real")
    output.rename(real)
    output.symlink_to(real)
    first = (real / "prepared.json").read_text()
    (inputs / "d.jsonl").write_text(jsonl(GOOD + [{"instruction": "one more", "output": "a new row"}]))
    for _ in range(2):  # the second time, nothing left behind by the first gets in the way
        try:
            cli.main(["prepare", str(tmp_path / "config.yaml"), "--output", str(output), "--overwrite"])
        except SystemExit as exc:
            pytest.fail(f"exit {exc.code}: {capsys.readouterr().err}")
    assert output.is_symlink() and output.resolve() == real.resolve()
    assert (real / "prepared.json").read_text() != first and "one more" in (real / "train.jsonl").read_text() + (
        real / "test.jsonl").read_text()
    assert sorted(p.name for p in output.parent.iterdir()) == ["prepared", "real"]  # no retired link left


def test_the_catalogue_is_large_enough():
    assert len(ERRORS) + len(DROPS) + 1 >= 25
