"""`affiner synth` writes in the glossary's own language unless --languages says otherwise, says why, and
ends with a `train` line this machine can run: the offline quickstart when the Hub is unreachable."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest

from affiner import cli
from affiner.core.config import load_config
from affiner.experiments.workflow import train
from affiner.synth import synth
from affiner.synth.banks import TRAIN_QUESTIONS
from affiner.synth.language import text_language
from affiner.synth.offline import fill
from affiner.synth.terms import Term

ENGLISH = [("WHO", "World Health Organization", "The United Nations agency for international public health."),
           ("NASA", "National Aeronautics and Space Administration", ""),
           ("ECB", "European Central Bank", "The central bank of the euro area and its monetary policy."),
           ("IETF", "Internet Engineering Task Force", "The body that develops the standards of the Internet."),
           ("CPU", "Central Processing Unit", "")]
FRENCH = [("OMS", "Organisation mondiale de la santé", "L'agence des Nations unies pour la santé publique."),
          ("INSEE", "Institut national de la statistique et des études économiques", ""),
          ("SNCF", "Société nationale des chemins de fer français", "L'entreprise publique du rail en France."),
          ("BNF", "Bibliothèque nationale de France", "")]

SKOS = """<?xml version="1.0" encoding="UTF-8"?>
<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" xmlns:skos="http://www.w3.org/2004/02/skos/core#">
  <skos:Concept rdf:about="http://example.org/who">
    <skos:prefLabel xml:lang="en">World Health Organization</skos:prefLabel>
    <skos:prefLabel xml:lang="fr">Organisation mondiale de la santé</skos:prefLabel>
    <skos:altLabel xml:lang="en">WHO</skos:altLabel>
    <skos:altLabel xml:lang="fr">OMS</skos:altLabel>
  </skos:Concept>
  <skos:Concept rdf:about="http://example.org/cern">
    <skos:prefLabel xml:lang="{cern}">CERN</skos:prefLabel>
    <skos:altLabel xml:lang="{cern}">Centre Européen pour la Recherche Nucléaire</skos:altLabel>
  </skos:Concept>
</rdf:RDF>
"""


@pytest.fixture(autouse=True)
def hub(monkeypatch):
    """The Hub as the test says, never as this machine's network says."""
    monkeypatch.setattr(synth, "hub_reachable", lambda: False)
    return monkeypatch


def write_csv(path: Path, entries: list[tuple[str, str, str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["acronym", "definition", "description"])
        writer.writerows(entries)
    return path


def run_synth(capsys, glossary: Path, *extra: str) -> tuple[list[dict], str]:
    """`affiner synth GLOSSARY --output train.json EXTRA`: the records written and what it printed."""
    output = glossary.with_name("train.json")
    capsys.readouterr()
    cli.main(["synth", str(glossary), "--output", str(output), "--per-entry", "4", "--overwrite", *extra])
    return json.loads(output.read_text(encoding="utf-8")), capsys.readouterr().out


def written_languages(records: list[dict]) -> set[str]:
    return {language for record in records for language in record["languages"]}


def test_an_english_glossary_gives_english_conversations_by_default(tmp_path, capsys):
    records, out = run_synth(capsys, write_csv(tmp_path / "glossary.csv", ENGLISH))
    assert written_languages(records) == {"en"}
    assert all(len(record["conversation"]) == 4 for record in records)
    # "Central Processing Unit" has no word that tells; the four others read as English.
    assert "languages: en (detected: 4 of 5 entries read as English, 1 undecided; --languages en,fr for both)" in out
    assert "conversations: en 20 train\n" in out


def test_a_french_glossary_gives_french_conversations(tmp_path, capsys):
    records, out = run_synth(capsys, write_csv(tmp_path / "glossaire.csv", FRENCH))
    assert written_languages(records) == {"fr"}
    french = {fill(question, Term(r["acronym"], ""), "fr") for r in records for question in TRAIN_QUESTIONS["fr"]}
    assert all(conversation[0]["content"] in french for r in records for conversation in r["conversation"])
    assert "languages: fr (detected: 4 of 4 entries read as French" in out


def test_a_bilingual_glossary_gives_both(tmp_path, capsys):
    records, out = run_synth(capsys, write_csv(tmp_path / "glossary.csv", ENGLISH + FRENCH))
    assert all(record["languages"] == ["en", "fr"] and len(record["conversation"]) == 8 for record in records)
    assert "languages: en, fr (detected: 4 of 9 entries read as English, 4 as French, 1 undecided; " \
           "--languages en or fr for one)" in out


def test_a_few_french_names_in_an_english_glossary_stay_english(tmp_path, capsys):
    english = ENGLISH + [(f"TF{n}", f"The task force number {n} of the committee", "") for n in range(5)]
    records, out = run_synth(capsys, write_csv(tmp_path / "glossary.csv", english + FRENCH[:1]))
    assert written_languages(records) == {"en"}
    assert "9 of 11 entries read as English, 1 as French (under a fifth), 1 undecided" in out


def test_names_alone_give_english_and_say_so(tmp_path, capsys):
    records, out = run_synth(capsys, write_csv(tmp_path / "glossary.csv", [
        ("CPU", "Central Processing Unit", ""), ("GPU", "Graphics Processing Unit", "")]))
    assert written_languages(records) == {"en"}
    assert "languages: en (undecided: none of the 2 entries has English or French words" in out


@pytest.mark.parametrize("cern, reading", [("fr", "2 of 2 entries read as French, 1 as English"),
                                           ("en", "2 of 2 entries read as English, 1 as French")])
def test_skos_language_tags_count_before_words(tmp_path, capsys, cern, reading):
    """WHO is tagged in both languages; CERN's tag counts, not the French words of its expansion."""
    path = tmp_path / "thesaurus.rdf"
    path.write_text(SKOS.replace("{cern}", cern), encoding="utf-8")
    records, out = run_synth(capsys, path)
    assert written_languages(records) == {"en", "fr"}
    assert f"languages: en, fr (detected: {reading};" in out


def test_a_french_tagged_thesaurus_is_french(tmp_path, capsys):
    path = tmp_path / "thesaurus.rdf"
    path.write_text(SKOS.replace('xml:lang="en"', 'xml:lang="fr"').replace("{cern}", "fr"), encoding="utf-8")
    records, _ = run_synth(capsys, path)
    assert written_languages(records) == {"fr"}


@pytest.mark.parametrize("flag, expected", [("en,fr", ["en", "fr"]), ("fr", ["fr"]), ("EN", ["en"])])
def test_explicit_languages_are_obeyed(tmp_path, capsys, flag, expected):
    records, out = run_synth(capsys, write_csv(tmp_path / "glossary.csv", ENGLISH), "--languages", flag)
    assert all(record["languages"] == expected for record in records)
    assert f"languages: {', '.join(expected)} (as --languages asked)" in out


def test_languages_auto_is_the_default(tmp_path, capsys):
    glossary = write_csv(tmp_path / "glossary.csv", ENGLISH + FRENCH)
    default, _ = run_synth(capsys, glossary)
    auto, _ = run_synth(capsys, glossary, "--languages", "auto")
    assert auto == default


@pytest.mark.parametrize("text, expected", [
    ("National Aeronautics and Space Administration", "en"),
    ("Queue of Unified Index Lookup Tables", "en"),
    ("Organisation mondiale de la santé", "fr"),
    ("L'agence des Nations unies", "fr"),
    ("Conseil Européen pour la Recherche Nucléaire", "fr"),
    ("Central Processing Unit", None),
    ("", None),
])
def test_text_language(text, expected):
    assert text_language(text) == expected


# ---------------------------------------------------------------------------------------- the next step


def test_the_next_step_is_the_offline_quickstart_when_the_hub_is_unreachable(tmp_path, capsys, hub):
    records, out = run_synth(capsys, write_csv(tmp_path / "glossary.csv", ENGLISH))
    next_line = out.strip().splitlines()[-1]
    assert next_line.startswith(f"next: affiner train quickstart --set data.train={tmp_path / 'train.json'} "
                                "--set data.test=null  # the Hub is unreachable")
    # The line pastes into a shell as it is: the reason is a comment.
    assert shlex.split(next_line.removeprefix("next: "), comments=True)[:3] == ["affiner", "train", "quickstart"]
    hub.setattr(synth, "hub_reachable", lambda: True)
    _, out = run_synth(capsys, write_csv(tmp_path / "glossary.csv", ENGLISH))
    assert f"next: affiner train {synth.RECIPE} --set data.train=" in out and "HF_TOKEN" in out


def test_the_quickstart_recipe_trains_on_synth_output(tmp_path, capsys, tiny_gemma):
    """The offline hint's command, with a tiny Gemma for the embedded one and two steps: every conversation
    synth wrote is read (none dropped), in the quickstart's own qa template. The tiny tokenizer spends more
    tokens per word than Gemma's, hence a longer data.max_length (Gemma's keeps them all within 128)."""
    glossary = write_csv(tmp_path / "glossary.csv", ENGLISH + FRENCH)
    cli.main(["synth", str(glossary), "--output", str(tmp_path / "train.json"), "--test-output",
              str(tmp_path / "test.json"), "--per-entry", "3"])
    config = load_config("quickstart", [f"data.train={tmp_path / 'train.json'}", f"data.test={tmp_path / 'test.json'}",
                                        f"model.base={tiny_gemma}", "data.max_length=256", "train.max_steps=2",
                                        "eval.every_steps=null", f"output_dir={tmp_path / 'runs'}"])
    folder = train(config)
    data = json.loads((folder / "data.json").read_text(encoding="utf-8"))
    assert data["train"]["examples"] == 9 * 2 * 3 and data["test"]["examples"] == 9 * 2 * 2
    assert json.loads((folder / "template.json").read_text(encoding="utf-8"))["name"] == "qa"
    assert (folder / "adapter_model.safetensors").stat().st_size > 0
