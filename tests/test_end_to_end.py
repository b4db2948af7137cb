"""End to end through the command line: the quickstart on the embedded Gemma 3 270M (slow), chat on a tiny run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from affiner.core.config import load_config
from affiner.experiments.workflow import train
from conftest import write_config


def _affiner(*args: str, cwd: Path, stdin: str | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "affiner", *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_quickstart_runs_end_to_end_on_the_embedded_model(tmp_path):
    result = _affiner("run", "--set", "train.max_steps=3", "--set", "eval.max_questions=4",
                      "--set", f"output_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("contains the reference", "stops with EOS before the limit", "perplexity (held-out answers)",
                 "Report:", "Run folder:"):
        assert line in result.stdout
    folder = next((tmp_path / "runs").iterdir())
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["base"]["questions"] == summary["tuned"]["questions"] == 4
    assert len(summary["answers"]) == 4 and all(a["base"]["text"] for a in summary["answers"])
    assert json.loads((folder / "template.json").read_text())["name"] == "qa"
    assert (folder / "adapter_model.safetensors").stat().st_size > 0
    assert (folder / "report.html").is_file() and (folder / "metrics.json").is_file()
    chat = _affiner("chat", str(folder), "--prompt", "What does QUILT stand for?", "--max-new-tokens", "8", "--greedy",
                    cwd=tmp_path)  # greedy: a sampled first token can be EOS, an empty answer
    # After 3 steps the tuned model may end its turn at once (seen since batches are grouped by length): then the
    # chat says so instead of printing an empty line.
    assert chat.returncode == 0 and (chat.stdout.strip() or "(empty answer" in chat.stderr), chat.stderr[-2000:]


def test_chat_answers_one_prompt_and_runs_a_session(tmp_path, tiny_gpt2):
    folder = train(load_config(str(write_config(tmp_path, tiny_gpt2, "embedded:glossary-train.json"))))
    one = _affiner("chat", str(folder), "--prompt", "What does QUILT stand for?", "--max-new-tokens", "5", "--greedy",
                   cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip()
    session = _affiner("chat", str(folder), "--max-new-tokens", "3", "--greedy", stdin="Define FROND.\nexit\n",
                       cwd=tmp_path)
    assert session.returncode == 0, session.stderr
    assert session.stdout.count("> ") == 2  # one prompt answered, then exit at the second
    missing = _affiner("chat", str(tmp_path / "nope"), cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@pytest.mark.slow
def test_a_small_glossary_gets_enough_steps_to_be_learned(tmp_path):
    """30 conversations (3 phrasings of 10 acronyms, written for this test) with the quickstart's settings:
    `train.epochs: auto` gives them 90+ steps where 3 passes gave 12, and the tuned model recalls the full
    expansion for questions phrased in ways it never saw."""
    data = Path(__file__).parent / "data"
    result = _affiner("run", "--set", f"data.train={data / 'small-glossary-train.json'}",
                      "--set", f"data.test={data / 'small-glossary-test.json'}", "--set", "eval.general=false",
                      "--set", f"output_dir={tmp_path / 'runs'}", cwd=tmp_path, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = next((tmp_path / "runs").iterdir())
    info = json.loads((folder / "run.json").read_text())
    assert info["epochs"] == 23 and info["planned_steps"] == 92
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["tuned"]["questions"] == 20 and summary["tuned"]["accuracy"] >= 0.8, summary["tuned"]
