"""--help as a user reads it: what affiner is for, a help line on every flag, one name per concept (the
former spellings still accepted), and examples that run as written outside this repository."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

import pytest

from affiner import __version__, cli
from affiner.core.config import recipe_names
from conftest import run_cli


def verb_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subparsers.choices)


def help_text(*argv: str, capsys) -> str:
    assert run_cli(*argv, "--help") == 0
    return capsys.readouterr().out


def test_the_top_level_help_says_what_affiner_does_and_the_workflow(capsys):
    text = help_text(capsys=capsys)
    assert "fine-tunes a language model" in text
    workflow = [text.index(f"affiner {verb} ") for verb in ("prepare", "train", "evaluate", "chat", "export")]
    assert workflow == sorted(workflow)  # in the order they are used
    assert all(name in text for name in recipe_names())
    assert "recipes/" not in text and "src/" not in text
    assert run_cli("--version") == 0
    assert capsys.readouterr().out.strip() == f"affiner {__version__}"


@pytest.mark.parametrize("verb", list(cli.VERBS))
def test_every_flag_of_every_verb_has_help(verb):
    parser = verb_parsers()[verb]
    missing = [action.option_strings or [action.dest] for action in parser._actions
               if not action.help or action.help == argparse.SUPPRESS]
    assert not missing, f"affiner {verb}: no help for {missing}"
    assert parser.description and parser.description.strip(), f"affiner {verb} has no description"


def example_commands(text: str) -> list[list[str]]:
    """Every example command line of a help text (`affiner ...`, maybe after VAR=value), continuation lines
    joined, comments and a `> FILE` redirection dropped; prose that mentions affiner is not a command."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        start = line.find("affiner ")
        before = line[:start].split()
        if start < 0 or not all(re.fullmatch(r"[A-Z_]+=\S*", word) for word in before):
            continue
        words = shlex.split(line[start:], comments=True)
        commands.append(words[: words.index(">")] if ">" in words else words)
    return commands


def written_files(text: str) -> set[str]:
    return set(re.findall(r">\s*(\S+\.ya?ml)", text))


def test_every_help_example_parses_and_names_a_shipped_recipe_or_a_file_it_writes(capsys):
    parser = cli.build_parser()
    texts = {"affiner": cli.__doc__, **{verb: p.description for verb, p in verb_parsers().items()}}
    checked = 0
    for name, text in texts.items():
        created = written_files(cli.__doc__) | written_files(text)
        for words in example_commands(text):
            if len(words) < 2 or words[1] not in cli.VERBS:
                continue  # `affiner VERB --help`: a placeholder, not a command
            try:
                args = parser.parse_args(words[1:])
            except SystemExit:
                pytest.fail(f"the example of `affiner {name} --help` does not parse: {shlex.join(words)}\n"
                            f"{capsys.readouterr().err}")
            config = getattr(args, "config", None)
            if config is not None:
                in_a_run = config.startswith("runs/") and config.endswith("/config.yaml")  # written by train
                assert config in recipe_names() or config in created or in_a_run, \
                    f"`{shlex.join(words)}` names {config}, neither a recipe nor a file an example writes"
            assert "recipes/" not in " ".join(words) and "src/" not in " ".join(words)
            checked += 1
    assert checked >= 40


@pytest.mark.parametrize("old,new,value", [
    ("--judge-url", "judge_endpoint", "http://127.0.0.1:11434/v1"),
    ("--judge-key-env", "judge_api_key_env", "OPENAI_API_KEY"),
    ("--base", "model", "gpt2"),
])
def test_former_flag_names_still_work_and_help_shows_the_new_one(old, new, value):
    parser = cli.build_parser("evaluate")
    assert getattr(parser.parse_args(["evaluate", old, value]), new) == value
    assert getattr(parser.parse_args(["evaluate", f"--{new.replace('_', '-')}", value]), new) == value
    shown = verb_parsers()["evaluate"].format_help()
    assert f"--{new.replace('_', '-')}" in shown and old not in shown.replace(f"{old}-", "")


def test_one_flag_name_per_concept_across_verbs():
    """A flag name means one thing, and one thing has one flag name: the endpoint, its model, its key."""
    names = {verb: {o for a in p._actions for o in a.option_strings} for verb, p in verb_parsers().items()}
    shown = {verb: p.format_help() for verb, p in verb_parsers().items()}
    assert {"--endpoint", "--model", "--api-key-env"} <= names["synth"]
    assert {"--judge-endpoint", "--judge-model", "--judge-api-key-env"} <= names["evaluate"]
    assert {"--model", "--adapter", "--template", "--max-new-tokens"} <= names["evaluate"] & names["chat"]
    for verb, text in shown.items():
        for spelling in ("--judge-url", "--judge-key-env", "--max-tokens", "--base MODEL"):
            assert spelling not in text, f"affiner {verb} --help still shows {spelling}"


def test_deepspeed_s_no_gpu_notice_is_not_shown_its_other_messages_are():
    """accelerate imports DeepSpeed whenever transformers saves a model (`affiner export --merged`): on a machine
    without a GPU it warned that it "was unable to detect" one, which users read as a fault."""
    pytest.importorskip("deepspeed")
    code = ("import logging; from affiner import cli; cli.quiet_third_party_logs()\n"
            "from deepspeed.accelerator import get_accelerator; get_accelerator()\n"
            "logging.getLogger('DeepSpeed').warning('another warning')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    said = result.stdout + result.stderr
    assert "another warning" in said and "unable to detect" not in said


def test_an_unknown_flag_of_a_verb_points_to_that_verb_s_help(capsys):
    assert run_cli("train", "quickstart", "--sett", "train.max_steps=2") == 2
    assert capsys.readouterr().err.strip() == ("affiner train: error: unrecognized arguments: --sett "
                                               "train.max_steps=2 (see affiner train --help).")
