"""`affiner generate`: glossary readers (JSON, JSONL, CSV, SKOS), offline phrasings, an LLM endpoint
(a scripted fake server on 127.0.0.1) with validation, retries, de-duplication and a resumable cache,
and a catalogue of bad inputs that must fail with one clear paragraph and leave files untouched."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from fake_endpoint import FakeServer, Reply, running_server

from affiner import cli
from affiner.synth import banks, llm, offline
from affiner.synth import synth as generate
from affiner.synth.glossary import read_glossary
from affiner.synth.offline import offline_conversations
from affiner.synth.replies import check_conversation, parse_conversations
from affiner.synth.terms import Term

GLOSSARY = [
    {"acronym": "WHO", "definition": "World Health Organization"},
    {"acronym": "NASA", "definition": "National Aeronautics and Space Administration"},
    {"acronym": "OMS", "definition": "Organisation mondiale de la santé"},
]
SECRET = "sk-gen-Zq8x1-very-secret"


@pytest.fixture
def server():
    with running_server() as srv:
        yield srv


@pytest.fixture(autouse=True)
def fast_and_isolated(monkeypatch, tmp_path):
    # The reply cache goes under AFFINER_CACHE, never the user's; transport retries wait a millisecond.
    monkeypatch.setenv("AFFINER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(llm, "RETRY_BACKOFF", 0.001)


def affiner_generate(*argv: str) -> None:
    """`affiner generate ARGV` as a user runs it: exit code 2 and a one-paragraph message on a user error."""
    cli.main(["generate", *argv])


def fails(capsys, *argv: str) -> str:
    """Run, expect exit code 2, and return the error message (the traceback-free paragraph)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        affiner_generate(*argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("affiner generate: error: ") and "Traceback" not in err
    return err


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def conversations(records: list[dict]) -> list[list[dict]]:
    return [c for record in records for c in record["conversation"]]


def questions(records: list[dict]) -> set[str]:
    return {c[0]["content"] for c in conversations(records)}


# ---------------------------------------------------------------------------------------- reading glossaries


def test_json_jsonl_and_csv_give_the_same_entries(tmp_path):
    plain = write_json(tmp_path / "plain.json", GLOSSARY)
    wrapped = write_json(tmp_path / "wrapped.json", {"data": GLOSSARY})
    lines = tmp_path / "lines.jsonl"
    lines.write_text("\n".join(json.dumps(e, ensure_ascii=False) for e in GLOSSARY) + "\n\n", encoding="utf-8")
    table = tmp_path / "table.csv"
    table.write_text("acronym,definition\n" + "".join(f"{e['acronym']},\"{e['definition']}\"\n" for e in GLOSSARY),
                     encoding="utf-8")
    expected = [(e["acronym"], e["definition"]) for e in GLOSSARY]
    for path in (plain, wrapped, lines, table):
        glossary = read_glossary(path)
        assert [(e.term.acronym, e.term.definition) for e in glossary.entries] == expected
        assert glossary.read == 3 and glossary.drops.total == 0
    assert read_glossary(plain).entries[1].where == f"{plain} item 2"
    assert read_glossary(lines).entries[2].where == f"{lines}:3"
    assert read_glossary(table).entries[0].where == f"{table}:2"


def test_columns_are_remapped_and_headers_matched_regardless_of_case(tmp_path):
    terms = tmp_path / "terms.csv"
    terms.write_text("term,meaning,notes\nWHO,World Health Organization,A UN agency.\n", encoding="utf-8")
    [entry] = read_glossary(terms, {"acronym": "term", "definition": "meaning", "description": "notes"}).entries
    assert entry.term == Term("WHO", "World Health Organization", "A UN agency.")
    shouting = tmp_path / "shouting.csv"
    shouting.write_text("Acronym , DEFINITION\nWHO,  World   Health Organization \n", encoding="utf-8")
    [entry] = read_glossary(shouting).entries
    assert entry.term == Term("WHO", "World Health Organization")  # whitespace collapsed


SKOS_RDF = """<?xml version="1.0" encoding="UTF-8"?>
<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
         xmlns:skos="http://www.w3.org/2004/02/skos/core#">
  <skos:Concept rdf:about="http://example.org/who">
    <skos:prefLabel xml:lang="en">World Health Organization</skos:prefLabel>
    <skos:prefLabel xml:lang="fr">Organisation mondiale de la santé</skos:prefLabel>
    <skos:altLabel xml:lang="en">WHO</skos:altLabel>
    <skos:altLabel xml:lang="fr">OMS</skos:altLabel>
    <skos:definition xml:lang="en">The United Nations agency for public health.</skos:definition>
    <skos:definition xml:lang="fr">L'agence des Nations unies pour la santé publique.</skos:definition>
  </skos:Concept>
  <skos:Concept rdf:about="http://example.org/cern">
    <skos:prefLabel>CERN</skos:prefLabel>
    <skos:definition>European Organization for Nuclear Research</skos:definition>
  </skos:Concept>
  <skos:Concept rdf:about="http://example.org/empty">
    <skos:definition>A concept nobody named.</skos:definition>
  </skos:Concept>
</rdf:RDF>
"""

SKOS_LOOSE = """<root xmlns:skos="http://www.w3.org/2004/02/skos/core#">
<data skos:Concept="http://example.org/kisti">
  <skos:prefLabel>kisti</skos:prefLabel>
  <skos:altLabel>Korean Institute for Science and Technology Information</skos:altLabel>
  <data><skos:definition>A research institute that runs Korea's national science information services.</skos:definition></data>
  <data skos:Concept="http://example.org/ntis">
    <skos:prefLabel>NTIS</skos:prefLabel>
    <skos:altLabel>National Science and Technology Information Service</skos:altLabel>
  </data>
</data>
</root>
"""


def test_skos_rdf_layout(tmp_path):
    path = tmp_path / "thesaurus.rdf"
    path.write_text(SKOS_RDF, encoding="utf-8")
    glossary = read_glossary(path)
    who, cern = glossary.entries
    # Two labels: the shorter is the acronym, the longer the definition, skos:definition the description.
    assert who.term == Term("WHO", "World Health Organization", "The United Nations agency for public health.")
    assert who.where == f"{path} concept 1 (line 4)"
    # xml:lang: French conversations get the French labels and description.
    assert who.in_language("fr") == Term("OMS", "Organisation mondiale de la santé",
                                         "L'agence des Nations unies pour la santé publique.")
    assert who.in_language("en") == who.term
    # One label: it is the acronym, and skos:definition is the definition.
    assert cern.term == Term("CERN", "European Organization for Nuclear Research")
    assert cern.where == f"{path} concept 2 (line 12)"
    assert glossary.read == 3
    assert glossary.drops.counts() == {"no label": 1}
    assert [row for row, reason in glossary.drops.dropped if reason == "no label"] == [f"{path} concept 3 (line 16)"]


def test_skos_loose_layout_with_a_nested_concept(tmp_path):
    path = tmp_path / "loose.xml"
    path.write_text(SKOS_LOOSE, encoding="utf-8")
    kisti, ntis = read_glossary(path).entries
    assert kisti.term == Term("kisti", "Korean Institute for Science and Technology Information",
                              "A research institute that runs Korea's national science information services.")
    # The nested concept's labels are its own, not its parent's.
    assert ntis.term == Term("NTIS", "National Science and Technology Information Service")
    assert (kisti.where, ntis.where) == (f"{path} concept 1 (line 2)", f"{path} concept 2 (line 6)")


def test_skos_output_has_one_record_per_language_specific_acronym(tmp_path, capsys):
    path = tmp_path / "thesaurus.rdf"
    path.write_text(SKOS_RDF, encoding="utf-8")
    affiner_generate(str(path), "--output", str(tmp_path / "train.json"), "--per-entry", "10")
    records = {r["acronym"]: r for r in load(tmp_path / "train.json")}
    assert set(records) == {"WHO", "OMS", "CERN"}
    assert records["OMS"]["languages"] == ["fr"] and records["CERN"]["languages"] == ["en", "fr"]
    answers = [c[1]["content"] for c in records["OMS"]["conversation"]]
    assert all("Organisation mondiale de la santé" in a for a in answers)
    # With 10 of 10 answer forms used, the longer variants carry the description.
    assert any("L'agence des Nations unies" in a for a in answers)
    assert "dropped 1: 1 no label" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- offline conversations


def run_offline(tmp_path: Path, *extra: str, name: str = "train.json") -> Path:
    glossary = write_json(tmp_path / "glossary.json", GLOSSARY)
    output = tmp_path / "out" / name
    affiner_generate(str(glossary), "--output", str(output), *extra)
    return output


def test_offline_is_deterministic_for_a_seed(tmp_path):
    first = run_offline(tmp_path, "--seed", "7", name="a.json").read_bytes()
    again = run_offline(tmp_path, "--seed", "7", name="b.json").read_bytes()
    other = run_offline(tmp_path, "--seed", "8", name="c.json").read_bytes()
    assert first == again
    assert first != other


def test_synth_is_the_verb_and_generate_its_alias(tmp_path):
    by_alias = run_offline(tmp_path, "--seed", "7", name="a.json").read_bytes()
    by_name = tmp_path / "out" / "b.json"
    cli.main(["synth", str(tmp_path / "glossary.json"), "--output", str(by_name), "--seed", "7"])
    assert by_name.read_bytes() == by_alias


def test_adding_an_entry_leaves_the_others_unchanged():
    term = Term("WHO", "World Health Organization")
    assert offline_conversations(term, "en", 5, seed=3) == offline_conversations(term, "en", 5, seed=3)
    assert offline_conversations(term, "en", 5, seed=3) != offline_conversations(term, "fr", 5, seed=3)


def test_offline_counts_languages_and_definitions(tmp_path, capsys):
    output = run_offline(tmp_path, "--per-entry", "5")
    records = load(output)
    assert [r["acronym"] for r in records] == ["WHO", "NASA", "OMS"]
    english = {q.format(acronym=r["acronym"]) for r in records for q in banks.TRAIN_QUESTIONS["en"]}
    french = {offline.fill(q, Term(r["acronym"], ""), "fr") for r in records
              for q in banks.TRAIN_QUESTIONS["fr"]}
    for record in records:
        assert record["ground_truth"] == next(e["definition"] for e in GLOSSARY if e["acronym"] == record["acronym"])
        assert record["languages"] == ["en", "fr"]
        asked = [c[0]["content"] for c in record["conversation"]]
        assert len(asked) == 10 and len(set(asked)) == 10
        assert sum(q in english for q in asked) == 5 and sum(q in french for q in asked) == 5
        for conversation in record["conversation"]:
            assert [m["role"] for m in conversation] == ["user", "assistant"]
            assert record["ground_truth"] in conversation[1]["content"]
            assert record["acronym"] in conversation[0]["content"]
    out = capsys.readouterr().out
    assert "read 3 entries, kept 3" in out and "en 15 train, fr 15 train" in out
    assert f"--set data.train={output} --set data.test=null" in out


def test_french_elision_before_a_vowel():
    asked = [c[0]["content"] for c in offline_conversations(Term("OMS", "Organisation mondiale de la santé"),
                                                            "fr", 22, seed=0)]
    assert "Qu'est-ce qu'OMS ?" in asked and "Quel est le nom complet d'OMS ?" in asked
    assert not any(" de OMS" in q or " que OMS" in q for q in asked)


def test_held_out_phrasings_never_appear_in_training(tmp_path, capsys):
    train = run_offline(tmp_path, "--per-entry", "22", "--test-output", str(tmp_path / "out" / "test.json"),
                        "--test-per-entry", "6")
    test = load(tmp_path / "out" / "test.json")
    assert len(conversations(test)) == 3 * 2 * 6
    assert not questions(test) & questions(load(train))
    for language in ("en", "fr"):
        assert not set(banks.HELD_OUT_QUESTIONS[language]) & set(banks.TRAIN_QUESTIONS[language])
    out = capsys.readouterr().out
    assert "en 66 train + 18 held-out" in out and "--set data.test=" + str(tmp_path / "out" / "test.json") in out


def test_output_is_read_back_by_training(tmp_path):
    from affiner.data.formats import to_examples
    from affiner.data.read import read_rows

    train = run_offline(tmp_path, "--per-entry", "4", "--test-output", str(tmp_path / "out" / "test.json"))
    examples = to_examples(read_rows(str(train)))
    assert len(examples) == 3 * 2 * 4
    assert {e.group for e in examples} == {"WHO", "NASA", "OMS"}
    assert all(e.reference in e.response for e in examples)
    held_out = to_examples(read_rows(str(tmp_path / "out" / "test.json")))
    assert len(held_out) == 3 * 2 * 2


def test_languages_can_be_chosen(tmp_path):
    records = load(run_offline(tmp_path, "--languages", "FR", "--per-entry", "3"))
    assert all(r["languages"] == ["fr"] and len(r["conversation"]) == 3 for r in records)


# ---------------------------------------------------------------------------------------- counted drops


@pytest.mark.parametrize("rows, reason, where", [
    ("WHO,World Health Organization\nNASA,   \n", "1 no definition", "glossary.csv:3"),
    ("WHO,World Health Organization\n,Orphan definition\n", "1 no acronym", "glossary.csv:3"),
    ("WHO,World Health Organization\nwho,world health  organization\n", "1 duplicate", "glossary.csv:3"),
])
def test_unusable_entries_are_counted_and_dropped(tmp_path, capsys, rows, reason, where):
    glossary = tmp_path / "glossary.csv"
    glossary.write_text("acronym,definition\n" + rows, encoding="utf-8")
    affiner_generate(str(glossary), "--output", str(tmp_path / "train.json"), "--per-entry", "2")
    assert [r["acronym"] for r in load(tmp_path / "train.json")] == ["WHO"]
    out = capsys.readouterr().out
    assert "read 2 entries, kept 1, dropped 1" in out
    assert f"{reason} ({tmp_path / where})" in out


def test_entries_missing_in_json_are_dropped_too(tmp_path):
    glossary = write_json(tmp_path / "glossary.json", GLOSSARY + [{"acronym": "X"}, {"definition": "Y", "acronym": None},
                                                                  {}, {"acronym": "", "definition": " "}])
    result = generate.generate(generate.Options(glossary=glossary, output=tmp_path / "train.json", per_entry=1),
                               say=lambda _: None)
    assert result.glossary.read == len(GLOSSARY) + 4  # empty items are entries too, dropped and counted
    assert result.glossary.drops.counts() == {"no definition": 1, "no acronym": 3}
    assert [row for row, reason in result.glossary.drops.dropped if reason == "no acronym"] == [
        f"{glossary} item {i}" for i in (5, 6, 7)]


# ---------------------------------------------------------------------------------------- the catalogue of bad inputs


def csv_file(rows: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "glossary.csv"
        path.write_text(rows, encoding="utf-8")
        return path
    return make


def raw_file(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data)
        return path
    return make


def glossary_beside_a_file(folder: Path) -> Path:
    (folder / "afile").write_text("not a folder", encoding="utf-8")
    return csv_file("acronym,definition\nWHO,x\n")(folder)


BAD_INPUTS = {
    "invalid JSON": (raw_file("glossary.json", b'[{"acronym": "WHO", "definition": "x"},\n {oops}]'), [],
                     r"glossary\.json:2 is not valid JSON"),
    "not UTF-8": (raw_file("glossary.csv", "acronym,definition\nWHO,x\nOMS,Organisation mondiale de la santé\n"
                           .encode("latin-1")), [], r"glossary\.csv:3 is not valid UTF-8"),
    "CSV without a definition column": (csv_file("acronym,meaning\nWHO,x\n"), [],
                                        r"glossary\.csv has no 'definition' column .*acronym, meaning.*--columns"),
    "mapped column missing": (csv_file("acronym,definition\nWHO,x\n"), ["--columns", "definition=meaning"],
                              r"glossary\.csv has no 'meaning' column"),
    "conflicting definitions": (csv_file("acronym,definition\nWHO,World Health Organization\nWHO,Who Has Oranges\n"),
                                [], r"'WHO' has two different definitions.*glossary\.csv:2.*glossary\.csv:3"),
    "malformed XML": (raw_file("glossary.xml", b'<rdf xmlns:skos="http://www.w3.org/2004/02/skos/core#">\n'
                               b'<skos:Concept><skos:prefLabel>WHO</skos:prefLabel>\n</rdf>\n'), [],
                      r"glossary\.xml:3:\d+ is not well-formed XML: mismatched tag"),
    "unbound XML prefix": (raw_file("glossary.xml", b"<root><skos:prefLabel>WHO</skos:prefLabel></root>"), [],
                           r"glossary\.xml:1:\d+ is not well-formed XML"),
    "empty JSON glossary": (raw_file("glossary.json", b"[]"), [], r"glossary\.json holds no entries"),
    "CSV with a header only": (csv_file("acronym,definition\n"), [], r"glossary\.csv holds no entries"),
    "empty CSV file": (csv_file(""), [], r"glossary\.csv is empty: a CSV file needs a header row"),
    "every entry unusable": (csv_file("acronym,definition\nWHO,\n,x\n"), [],
                             r"none of its 2 entries is usable \(1 no definition .*glossary\.csv:2.*1 no acronym"),
    "XML without any concept": (raw_file("glossary.xml", b"<root><item>WHO</item></root>"), [],
                                r"glossary\.xml holds no entries"),
    "JSON object, not a list": (raw_file("glossary.json", b'{"WHO": "World Health Organization"}'), [],
                                r"glossary\.json must hold a JSON list"),
    "JSON item not an object": (raw_file("glossary.json", b'[{"acronym": "A", "definition": "B"}, "WHO"]'), [],
                                r"glossary\.json item 2 must be a JSON object"),
    "definition not text": (raw_file("glossary.json", b'[{"acronym": "A", "definition": ["B"]}]'), [],
                            r"glossary\.json item 1: 'definition' must be text"),
    "unsupported file type": (raw_file("glossary.txt", b"WHO: World Health Organization\n"), [],
                              r"glossary\.txt has an unsupported type '\.txt'"),
    "missing glossary": (lambda folder: folder / "nowhere.csv", [], r"glossary file .*nowhere\.csv does not exist"),
    "per-entry over the offline pool": (csv_file("acronym,definition\nWHO,x\n"), ["--per-entry", "23"],
                                        r"--per-entry 23 .*the maximum is 22"),
    "test-per-entry over the held-out pool": (csv_file("acronym,definition\nWHO,x\n"),
                                              ["--test-output", "{folder}/test.json", "--test-per-entry", "7"],
                                              r"--test-per-entry 7 .*the maximum is 6"),
    "per-entry zero": (csv_file("acronym,definition\nWHO,x\n"), ["--per-entry", "0"],
                       r"--per-entry: 0 is out of range: it must be a whole number of at least 1"),
    "unknown language": (csv_file("acronym,definition\nWHO,x\n"), ["--languages", "en,de"],
                         r"unknown language code\(s\) de; supported: en, fr"),
    "unknown --columns key": (csv_file("acronym,definition\nWHO,x\n"), ["--columns", "acronim=term"],
                              r"unknown key 'acronim' .*Did you mean 'acronym'"),
    "malformed --columns": (csv_file("acronym,definition\nWHO,x\n"), ["--columns", "acronym"],
                            r"must look like key=name"),
    "--columns on SKOS": (raw_file("glossary.rdf", SKOS_RDF.encode()), ["--columns", "acronym=x"],
                          r"--columns does not apply to the SKOS file .*glossary\.rdf"),
    "--model without --endpoint": (csv_file("acronym,definition\nWHO,x\n"), ["--model", "gemma3:27b"],
                                   r"only apply with --endpoint"),
    "--endpoint without --model": (csv_file("acronym,definition\nWHO,x\n"), ["--endpoint", "http://127.0.0.1:9/v1"],
                                   r"--endpoint needs --model"),
    "bad endpoint URL": (csv_file("acronym,definition\nWHO,x\n"), ["--endpoint", "127.0.0.1:11434", "--model", "m"],
                         r"generation endpoint URL '127\.0\.0\.1:11434' is not an http:// or https:// address"),
    "--test-per-entry without --test-output": (csv_file("acronym,definition\nWHO,x\n"), ["--test-per-entry", "3"],
                                               r"--test-per-entry needs --test-output"),
    "--concurrency zero": (csv_file("acronym,definition\nWHO,x\n"),
                           ["--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--concurrency", "0"],
                           r"--concurrency: 0 is out of range"),
    "output folder is a file": (glossary_beside_a_file, ["--output", "{folder}/afile/train.json"],
                                r"cannot write .*afile"),
    "output is the test output": (csv_file("acronym,definition\nWHO,x\n"), ["--test-output", "{folder}/train.json"],
                                  r"--output and --test-output are the same file"),
    "definition a number": (raw_file("glossary.json", b'[{"acronym": "V1", "definition": 1.10}]'), [],
                            r"glossary\.json item 1: 'definition' must be text, not the number 1\.1"),
    "acronym NaN": (raw_file("glossary.json", b'[{"acronym": NaN, "definition": "Not a Number"}]'), [],
                    r"glossary\.json item 1: 'acronym' must be text, not NaN"),
    "test output not JSON": (csv_file("acronym,definition\nWHO,x\n"), ["--test-output", "{folder}/test.csv"],
                             r"the output .*test\.csv must be a \.json or \.jsonl file"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly_and_touches_nothing(tmp_path, capsys, case):
    make, extra, message = BAD_INPUTS[case]
    glossary = make(tmp_path)
    output = tmp_path / "train.json"
    output.write_bytes(b'["an earlier, precious output"]\n')
    before = sorted(p.name for p in tmp_path.iterdir())
    # --overwrite: even when replacing is allowed, a failed run must not replace anything.
    err = fails(capsys, str(glossary), "--output", str(output), "--overwrite",
                *[arg.format(folder=tmp_path) for arg in extra])
    assert re.search(message, err), err
    assert output.read_bytes() == b'["an earlier, precious output"]\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary file left behind


def test_existing_outputs_are_refused_without_overwrite(tmp_path, capsys):
    glossary = write_json(tmp_path / "glossary.json", GLOSSARY)
    output, test = tmp_path / "train.json", tmp_path / "test.json"
    output.write_bytes(b"old train")
    err = fails(capsys, str(glossary), "--output", str(output))
    assert f"{output} already exists" in err and "--overwrite" in err
    output.unlink()
    test.write_bytes(b"old test")
    err = fails(capsys, str(glossary), "--output", str(output), "--test-output", str(test))
    assert f"{test} already exists" in err
    assert not output.exists() and test.read_bytes() == b"old test"
    affiner_generate(str(glossary), "--output", str(output), "--test-output", str(test), "--overwrite")
    assert load(test) and load(output)


# ---------------------------------------------------------------------------------------- the endpoint


FIELD = re.compile(r"^(Acronym|Acronyme|Meaning|Signification|Number of conversations|Nombre de conversations)"
                   r" ?: (.*)$", re.MULTILINE)
ATTEMPT = re.compile(r"\((?:request|demande) (\d+)\)")


def prompt(body: dict) -> dict:
    text = body["messages"][-1]["content"]
    fields = dict(FIELD.findall(text))
    return {"acronym": fields.get("Acronym") or fields["Acronyme"],
            "definition": fields.get("Meaning") or fields["Signification"],
            "count": int(fields.get("Number of conversations") or fields["Nombre de conversations"]),
            "language": "fr" if "Acronyme" in fields else "en",
            "attempt": int(ATTEMPT.search(text).group(1))}


def written(asked: dict, count: int | None = None, start: int = 0) -> list:
    """Good conversations, their questions distinct across languages and attempts."""
    tag = f"{asked['language']}-{asked['attempt']}"
    return [[{"role": "user", "content": f"Question {tag}-{i}: what is {asked['acronym']}?"},
             {"role": "assistant", "content": f"{asked['acronym']} means {asked['definition']}."}]
            for i in range(start, start + (asked["count"] if count is None else count))]


def writer(body: dict) -> Reply:
    return Reply(json.dumps(written(prompt(body)), ensure_ascii=False))


def run_endpoint(server: FakeServer, tmp_path: Path, *extra: str, glossary: list[dict] | None = None,
                 output: str = "train.json") -> Path:
    path = write_json(tmp_path / "glossary.json", GLOSSARY if glossary is None else glossary)
    affiner_generate(str(path), "--output", str(tmp_path / output), "--endpoint", server.url, "--model", "writer",
                     *extra)
    return tmp_path / output


def test_endpoint_happy_path(server, tmp_path, capsys):
    server.behaviour = writer
    output = run_endpoint(server, tmp_path, "--per-entry", "3", "--test-output", str(tmp_path / "test.json"),
                          "--test-per-entry", "2", "--temperature", "0.5")
    train, test = load(output), load(tmp_path / "test.json")
    assert [r["acronym"] for r in train] == ["WHO", "NASA", "OMS"]
    for record in train:
        assert record["languages"] == ["en", "fr"] and len(record["conversation"]) == 6
        assert all(record["ground_truth"] in c[1]["content"] for c in record["conversation"])
    assert len(conversations(test)) == 3 * 2 * 2 and not questions(test) & questions(train)
    # One request per entry and language, for the training and the held-out conversations together.
    assert server.attempts == 6
    bodies = [body for _, body in server.requests]
    assert {b["model"] for b in bodies} == {"writer"} and {b["temperature"] for b in bodies} == {0.5}
    assert {prompt(b)["count"] for b in bodies} == {5}
    french = next(b for b in bodies if prompt(b)["language"] == "fr")["messages"][-1]["content"]
    assert french.startswith("Écris 5 conversations") and "\nAcronyme : " in french
    out = capsys.readouterr().out
    assert "6 requests sent, 0 replies from the cache" in out and "en 9 train + 6 held-out" in out
    from affiner.data.formats import to_examples
    from affiner.data.read import read_rows

    assert len(to_examples(read_rows(str(output)))) == 18

    # Run again: everything comes from the cache, and the output is the same.
    before = output.read_bytes()
    run_endpoint(server, tmp_path, "--per-entry", "3", "--test-output", str(tmp_path / "test.json"),
                 "--test-per-entry", "2", "--temperature", "0.5", "--overwrite")
    assert server.attempts == 6 and output.read_bytes() == before
    assert "0 requests sent, 6 replies from the cache" in capsys.readouterr().out


def test_replies_are_parsed_tolerantly():
    good = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    text = json.dumps(good)
    assert parse_conversations(text) == good
    assert parse_conversations(f"```json\n{text}\n```") == good
    assert parse_conversations(f"Here you go:\n{text}\nHope this helps!") == good
    assert parse_conversations(f"<think>Let me write [things].</think>\n{text}") == good
    assert parse_conversations(json.dumps({"conversations": good})) == good
    assert parse_conversations(json.dumps(good[0])) == good  # one conversation, unwrapped
    for broken in ["", "Sorry, I cannot help with that.", "[[{\"role\": \"user\"", '{"a": 1}', "42"]:
        assert parse_conversations(broken) is None


@pytest.mark.parametrize("conversation, reason", [
    ([{"role": "user", "content": "What is WHO?"}, {"role": "assistant", "content": "world  HEALTH organization."}],
     None),
    ([{"role": "assistant", "content": "World Health Organization"}], "wrong roles"),
    ([{"role": "user", "content": "What is WHO?"}], "wrong roles"),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "WHO?"},
      {"role": "assistant", "content": "World Health Organization"}], "wrong roles"),
    ([{"role": "user", "content": "What is WHO?"}, {"role": "assistant", "content": "A UN agency."}],
     "definition missing"),
    ([{"role": "user", "content": "WHO?"}, {"role": "assistant", "content": "World Health Organization."},
      {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}], "definition missing"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "World Health Organization"}],
     "empty message"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "World Health Organization"}],
     "not a list of messages"),
    ("What is WHO?", "not a list of messages"),
    ([], "not a list of messages"),
    ([{"role": "user", "content": "Does WHO stand for World Health Organization?"},  # the answer given away
      {"role": "assistant", "content": "Yes: World Health Organization."}], "question holds the definition"),
])
def test_conversation_checks(conversation, reason):
    assert check_conversation(conversation, "World Health Organization")[1] == reason


def test_accents_matter_in_the_definition():
    answer = [{"role": "user", "content": "Que signifie OMS ?"},
              {"role": "assistant", "content": "OMS : Organisation mondiale de la sante."}]
    assert check_conversation(answer, "Organisation mondiale de la santé")[1] == "definition missing"


def test_broken_json_then_valid_json_is_retried(server, tmp_path, capsys):
    server.script = [Reply("Sure! Here are some conversations: [[{\"role\": \"user\", \"content\": \"WHO?\"")]
    server.behaviour = writer
    output = run_endpoint(server, tmp_path, "--per-entry", "2", "--languages", "en", "--concurrency", "1",
                          glossary=GLOSSARY[:1])
    assert len(conversations(load(output))) == 2
    assert server.attempts == 2
    assert [prompt(body)["attempt"] for _, body in server.requests] == [1, 2]
    assert "2 requests sent" in (out := capsys.readouterr().out) and "1 broken JSON (WHO (en))" in out


def test_conversations_without_the_definition_are_dropped_and_counted(server, tmp_path, capsys):
    def sloppy(body: dict) -> Reply:
        asked = prompt(body)
        good = written(asked, count=1)
        bad = [[{"role": "user", "content": f"Off topic {asked['attempt']}-{i}?"},
                {"role": "assistant", "content": "An agency, I think."}] for i in range(2)]
        return Reply(json.dumps(bad + good))

    server.behaviour = sloppy
    output = run_endpoint(server, tmp_path, "--per-entry", "3", "--languages", "en", glossary=GLOSSARY[:1])
    record = load(output)[0]
    # One usable conversation per reply: three attempts give the three wanted.
    assert len(record["conversation"]) == 3 and server.attempts == 3
    assert all("World Health Organization" in c[1]["content"] for c in record["conversation"])
    out = capsys.readouterr().out
    assert "dropped 6 conversations: 6 definition missing (WHO (en))" in out
    # Later attempts ask only for what is missing, and name the questions already used.
    counts = [prompt(body)["count"] for _, body in server.requests]
    assert counts == [3, 2, 1]
    assert "Question en-1-0: what is WHO?" in server.requests[1][1]["messages"][-1]["content"]


def test_duplicate_questions_are_removed(server, tmp_path, capsys):
    def repetitive(body: dict) -> Reply:
        asked = prompt(body)
        answer = f"It means {asked['definition']}."
        conversation = [
            [{"role": "user", "content": "What is WHO?"}, {"role": "assistant", "content": answer}],
            [{"role": "user", "content": "what is  WHO"}, {"role": "assistant", "content": answer}],
            [{"role": "user", "content": "What is WHO ?!"}, {"role": "assistant", "content": answer}],
            [{"role": "user", "content": "Define WHO."}, {"role": "assistant", "content": answer}],
        ]
        return Reply(json.dumps(conversation))

    server.behaviour = repetitive
    output = run_endpoint(server, tmp_path, "--per-entry", "2", "--languages", "en", glossary=GLOSSARY[:1])
    assert [c[0]["content"] for c in conversations(load(output))] == ["What is WHO?", "Define WHO."]
    assert "2 duplicate question" in capsys.readouterr().out


def test_short_replies_are_kept_and_reported(server, tmp_path, capsys):
    server.behaviour = lambda body: Reply(json.dumps(written(prompt(body), count=1, start=0)[:1]
                                                     if prompt(body)["attempt"] == 1 else []))
    output = run_endpoint(server, tmp_path, "--per-entry", "3", "--languages", "en", "--max-attempts", "2",
                          glossary=GLOSSARY[:1])
    assert len(conversations(load(output))) == 1
    assert "fewer conversations than asked for: WHO (en) 1 of 3" in capsys.readouterr().out


def test_a_held_out_file_left_empty_by_the_endpoint_says_why_and_how_to_get_more(server, tmp_path, capsys):
    # Two good conversations a reply, whatever was asked: all go to training (--per-entry 2), none is held out.
    server.behaviour = lambda body: Reply(json.dumps(written(prompt(body), count=2)))
    glossary = write_json(tmp_path / "glossary.json", GLOSSARY[:1])
    test = tmp_path / "test.json"
    err = fails(capsys, str(glossary), "--output", str(tmp_path / "train.json"), "--endpoint", server.url,
                "--model", "writer", "--languages", "en", "--per-entry", "2", "--test-output", str(test),
                "--max-attempts", "1")
    assert f"no conversation for {test}: nothing was written" in err
    assert "the first --per-entry 2 of each entry and language are trained on" in err
    assert "fewer than asked for: WHO (en) 2 of 4" in err and "higher --max-attempts (now 1)" in err
    assert not test.exists() and not (tmp_path / "train.json").exists()


def test_interrupted_generation_resumes_with_only_the_missing_requests(server, tmp_path, capsys):
    lock = threading.Lock()
    served = []

    def dies_after_two(body: dict) -> Reply:
        with lock:
            if len(served) >= 2:
                return Reply(status=500, body=b'{"error": "out of memory"}')
            served.append(body)
        return writer(body)

    server.behaviour = dies_after_two
    glossary = write_json(tmp_path / "glossary.json", GLOSSARY)
    argv = [str(glossary), "--output", str(tmp_path / "train.json"), "--endpoint", server.url, "--model", "writer",
            "--per-entry", "2"]
    err = fails(capsys, *argv)
    assert server.url in err and "HTTP 500" in err and "running the same command again resumes" in err
    assert not (tmp_path / "train.json").exists()

    before = server.attempts
    server.behaviour = writer
    affiner_generate(*argv)
    asked_again = [prompt(body) for _, body in server.requests[before:]]
    done_first = {(prompt(b)["acronym"], prompt(b)["language"]) for b in served}
    assert len(asked_again) == 6 - 2
    assert not {(a["acronym"], a["language"]) for a in asked_again} & done_first
    assert len(conversations(load(tmp_path / "train.json"))) == 3 * 2 * 2
    assert "4 requests sent, 2 replies from the cache" in capsys.readouterr().out


def test_ctrl_c_keeps_finished_replies_for_the_next_run(server, tmp_path, capsys, monkeypatch):
    def slow_writer(body: dict) -> Reply:
        reply = writer(body)
        reply.delay = 0.05
        return reply

    server.behaviour = slow_writer
    real_wait = llm.wait

    def ctrl_c_after_two_replies(futures, return_when="ALL_COMPLETED"):
        while server.attempts < 3:  # two replies in, the third under way
            threading.Event().wait(0.005)
        raise KeyboardInterrupt

    monkeypatch.setattr(llm, "wait", ctrl_c_after_two_replies)
    glossary = write_json(tmp_path / "glossary.json", GLOSSARY)
    argv = [str(glossary), "--output", str(tmp_path / "train.json"), "--endpoint", server.url, "--model", "writer",
            "--per-entry", "2", "--concurrency", "1"]
    with pytest.raises(SystemExit) as interrupted:
        affiner_generate(*argv)
    assert interrupted.value.code == 130
    for thread in threading.enumerate():
        if thread.name.startswith("generate"):
            thread.join(timeout=5)  # the request under way finishes, and is cached
    assert "run the same command again to resume" in capsys.readouterr().err
    assert not (tmp_path / "train.json").exists()
    first = [(prompt(b)["acronym"], prompt(b)["language"]) for _, b in server.requests]
    assert 3 <= len(first) < 6

    monkeypatch.setattr(llm, "wait", real_wait)
    affiner_generate(*argv)
    second = [(prompt(b)["acronym"], prompt(b)["language"]) for _, b in server.requests[len(first):]]
    assert sorted(first + second) == sorted((e["acronym"], lang) for e in GLOSSARY for lang in ("en", "fr"))
    assert f"{len(second)} requests sent, {len(first)} replies from the cache" in capsys.readouterr().out


def test_broken_json_on_every_attempt_is_an_error_and_is_not_cached(server, tmp_path, capsys):
    def broken_for_nasa(body: dict) -> Reply:
        return Reply("I'd rather not.") if prompt(body)["acronym"] == "NASA" else writer(body)

    server.behaviour = broken_for_nasa
    glossary = write_json(tmp_path / "glossary.json", GLOSSARY)
    output = tmp_path / "train.json"
    output.write_bytes(b"keep me")
    argv = [str(glossary), "--output", str(output), "--endpoint", server.url, "--model", "writer",
            "--per-entry", "2", "--max-attempts", "2", "--overwrite"]
    err = fails(capsys, *argv)
    assert re.search(r"gave no usable conversation for 2 entry/language pair\(s\): NASA \(en\) from "
                     r".*glossary\.json item 2: 2 broken JSON.*NASA \(fr\)", err), err
    assert output.read_bytes() == b"keep me"
    assert server.attempts == 4 + 2 * 2  # the four good pairs once, NASA twice per language

    # The good replies were cached, the broken ones were not: a rerun asks NASA again, and only NASA.
    server.behaviour = writer
    affiner_generate(*argv)
    assert server.attempts == 8 + 2
    assert len(load(output)) == 3


def test_unreachable_endpoint_is_an_error_naming_the_url(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(llm, "RETRY_BACKOFF", 10.0)  # a server never started is not waited for
    with HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as closed:
        port = closed.server_address[1]  # bound, then closed: nothing listens there afterwards
    glossary = write_json(tmp_path / "glossary.json", GLOSSARY)
    output = tmp_path / "train.json"
    output.write_bytes(b"keep me")
    url = f"http://127.0.0.1:{port}/v1"
    started = time.monotonic()
    err = fails(capsys, str(glossary), "--output", str(output), "--endpoint", url, "--model", "m", "--overwrite")
    assert time.monotonic() - started < 5
    assert url in err and "Is the server running" in err and "Nothing was written" in err
    assert output.read_bytes() == b"keep me"


def test_unauthorised_endpoint_is_an_error_without_the_key(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GEN_TEST_KEY", SECRET)
    # A careless server that echoes the Authorization header in its error body.
    server.behaviour = lambda body: Reply(status=401, body=f'{{"error": "bad key Bearer {SECRET}"}}'.encode())
    glossary = write_json(tmp_path / "glossary.json", GLOSSARY)
    output = tmp_path / "train.json"
    output.write_bytes(b"keep me")
    err = fails(capsys, str(glossary), "--output", str(output), "--endpoint", server.url, "--model", "m",
                "--api-key-env", "GEN_TEST_KEY", "--overwrite", "--concurrency", "1")
    assert "HTTP 401" in err and server.url in err and "GEN_TEST_KEY" in err
    assert SECRET not in err and "[api key]" in err
    assert server.attempts == 1  # not retried, and no other entry asked
    assert output.read_bytes() == b"keep me"


def test_missing_api_key_variable_is_an_error(server, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GEN_ABSENT_KEY", raising=False)
    glossary = write_json(tmp_path / "glossary.json", GLOSSARY)
    err = fails(capsys, str(glossary), "--output", str(tmp_path / "train.json"), "--endpoint", server.url,
                "--model", "m", "--api-key-env", "GEN_ABSENT_KEY")
    assert "GEN_ABSENT_KEY" in err and server.attempts == 0


def test_api_key_is_sent_and_never_stored_or_printed(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GEN_TEST_KEY", SECRET)
    server.behaviour = writer
    output = run_endpoint(server, tmp_path, "--per-entry", "2", "--api-key-env", "GEN_TEST_KEY",
                          "--test-output", str(tmp_path / "test.json"))
    assert {headers["Authorization"] for headers, _ in server.requests} == {f"Bearer {SECRET}"}
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert output in files and tmp_path / "test.json" in files
    assert any(p.suffix == ".sqlite3" for p in files)
    assert (tmp_path / "cache" / "generate").is_dir()  # $AFFINER_CACHE/generate
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path


def test_endpoint_can_write_more_than_the_offline_pool(server, tmp_path):
    server.behaviour = writer
    output = run_endpoint(server, tmp_path, "--per-entry", "30", "--languages", "fr", glossary=GLOSSARY[:1])
    assert len(conversations(load(output))) == 30


def test_acronyms_that_differ_only_by_case_are_other_abbreviations(tmp_path, capsys):
    glossary = csv_file("acronym,definition\nMW,megawatt\nmW,milliwatt\nmw,Megawatt\n")(tmp_path)
    affiner_generate(str(glossary), "--output", str(tmp_path / "train.json"))
    assert sorted(r["acronym"] for r in load(tmp_path / "train.json")) == ["MW", "mW"]
    assert "1 duplicate" in capsys.readouterr().out  # mw, megawatt: MW again, written otherwise


@pytest.mark.parametrize("name", ["glossary #2.json", "null.json", "it's.json"])
def test_the_advised_command_reads_back_the_files_written(tmp_path, capsys, name):
    """The next: line's --set values are quoted for YAML as well as for the shell ("glossary #2.json" would read
    as "glossary")."""
    import shlex

    from affiner.core.yaml_input import apply_overrides

    glossary = write_json(tmp_path / "glossary.json", GLOSSARY)
    output, test = tmp_path / name, tmp_path / f"test {name}"
    capsys.readouterr()
    affiner_generate(str(glossary), "--output", str(output), "--test-output", str(test))
    advised = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("next: "))
    words = shlex.split(advised.removeprefix("next: ").split("  # ")[0])
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    assert apply_overrides({}, overrides) == {"data": {"train": str(output), "test": str(test)}}


def test_one_entry_without_a_held_out_file_is_advised_to_write_one(tmp_path, capsys):
    glossary = csv_file("acronym,definition\nWHO,World Health Organization\n")(tmp_path)
    affiner_generate(str(glossary), "--output", str(tmp_path / "train.json"))
    advised = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("next: "))
    assert "--test-output" in advised and "data.test=null" not in advised


def test_an_output_that_appears_while_synth_runs_is_left_untouched(tmp_path, capsys, monkeypatch):
    glossary = write_json(tmp_path / "glossary.json", GLOSSARY)
    output = tmp_path / "train.json"
    real = generate.offline_pairs

    def another_writer_meanwhile(*args, **kwargs):
        output.write_text('["written by someone else meanwhile"]')
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "offline_pairs", another_writer_meanwhile)
    err = fails(capsys, str(glossary), "--output", str(output))
    assert "appeared while synth ran" in err and output.read_text() == '["written by someone else meanwhile"]'


def test_ctrl_c_while_requests_are_under_way_says_it_waits_and_a_second_one_quits_at_once(server, tmp_path):
    """The requests under way are waited for (their replies are cached); a second Ctrl-C ends the wait, cleanly."""
    import os
    import signal
    import subprocess
    import sys

    server.behaviour = lambda body: (time.sleep(30), Reply())[1]  # an endpoint far slower than the user's patience
    glossary = write_json(tmp_path / "glossary.json", GLOSSARY)
    env = {**os.environ, "AFFINER_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen([sys.executable, "-m", "affiner", "synth", str(glossary), "--output",
                                str(tmp_path / "train.json"), "--endpoint", server.url, "--model", "m"],
                               stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while not server.requests and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    started = time.time()
    assert process.wait(timeout=20) == 130 and time.time() - started < 10
    err = process.stderr.read()
    assert "Waiting for the" in err and "Ctrl-C again quits at once" in err and "Traceback" not in err
    assert not (tmp_path / "train.json").exists()


def test_a_jsonl_output_holds_one_record_per_line_that_prepare_reads(tmp_path):
    from affiner.data.read import read_rows

    glossary = write_json(tmp_path / "glossary.json", GLOSSARY)
    affiner_generate(str(glossary), "--output", str(tmp_path / "train.jsonl"), "--test-output",
                     str(tmp_path / "test.json"))
    lines = (tmp_path / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(GLOSSARY) and all(json.loads(line)["conversation"] for line in lines)
    assert [r for r, _ in read_rows(str(tmp_path / "train.jsonl"))] == [json.loads(line) for line in lines]
