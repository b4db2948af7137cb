"""`affiner app`: the comparison page in Streamlit's AppTest, the launcher, and once in headless Chromium."""

from __future__ import annotations

import argparse
import base64
import csv
import io
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from affiner.core.runfolder import model_names
from affiner.commands import app as app_command
from affiner.interfaces import app
from affiner.core.config import load_config
from affiner.core.errors import AffinerError
from affiner.core.runfolder import read_json, write_json
from affiner.training.run import train
from conftest import copy_run, run_cli, write_config

PAGE = str(app.PAGE_SCRIPT)
QUESTION = "What does QUILT stand for?"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama) -> list[Path]:
    """Two tiny LoRA runs on one base under one runs/ folder: alpha, then beta (the latest)."""
    root = tmp_path_factory.mktemp("app")
    folders = []
    for name in ("alpha", "beta"):
        config = write_config(root / name, tiny_llama, "embedded:glossary-train.json", name=name,
                              output_dir=str(root / "runs"))
        folders.append(train(load_config(str(config))))
    metrics = folders[0] / "metrics.jsonl"  # as logged with eval.every_steps: held-out scores on some steps
    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    records[1].update(eval_contains=0.0, eval_rouge_l=0.1, eval_loss=4.0)
    records[-1].update(eval_contains=0.5, eval_rouge_l=0.4, eval_loss=3.0)
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    now = time.time()
    os.utime(folders[0], (now - 60, now - 60))
    os.utime(folders[1], (now, now))
    (folders[1] / "report.html").write_text("<html><body><h1>Report of beta</h1></body></html>", encoding="utf-8")
    return folders


@pytest.fixture
def downloads(monkeypatch) -> list[dict]:
    """What the page hands to st.download_button, as the browser would receive it."""
    from streamlit.runtime.media_file_manager import MediaFileManager

    seen: list[dict] = []
    real_add = MediaFileManager.add

    def add(self, path_or_data, mimetype, coordinates, file_name=None, is_for_static_download=False):
        seen.append({"data": path_or_data, "mimetype": mimetype, "file_name": file_name})
        return real_add(self, path_or_data, mimetype, coordinates, file_name=file_name,
                        is_for_static_download=is_for_static_download)

    monkeypatch.setattr(MediaFileManager, "add", add)
    return seen


def page(monkeypatch, folders: list[Path], key: str | None = None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(app.RUNS_ENV, os.pathsep.join(str(f) for f in folders))
    if key is None:
        monkeypatch.delenv(app.KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(app.KEY_ENV, key)
    return AppTest.from_file(PAGE, default_timeout=60)


def boxes(at, kind: str) -> list[tuple[str, str]]:
    """(model name, visible text) of every answer box of this kind on the page."""
    found = []
    for element in at.markdown:
        match = re.search(rf'data-testid="answer-{kind}" data-model="([^"]*)"', element.value)
        if match:
            found.append((match.group(1), re.sub(r"<[^>]+>", "", element.value).strip()))
    return found


def generate(at, instruction: str = QUESTION):
    at.text_area(key="instruction").input(instruction)
    at.button(key="generate").click().run()
    assert not at.exception, at.exception
    return at


# ---------------------------------------------------------------------------------------- the page


def test_the_repetition_penalty_starts_at_the_run_s_and_a_link_overrides_it(monkeypatch, runs, tmp_path):
    penalised = copy_run(runs[0], tmp_path / "runs", eval__repetition_penalty=1.2)
    at = page(monkeypatch, [penalised]).run()
    assert not at.exception, at.exception
    assert at.slider(key="repetition_penalty").value == pytest.approx(1.2)  # as its evaluation decoded
    at = page(monkeypatch, [penalised])
    at.query_params.update(repetition_penalty="1.5")
    assert at.run().slider(key="repetition_penalty").value == pytest.approx(1.5)
    # Turned off on this page, the penalty stays off in the link: a new page would start from the run's 1.2.
    at = page(monkeypatch, [penalised]).run()
    at.slider(key="repetition_penalty").set_value(1.0)
    generate(at)
    assert float(at.query_params["repetition_penalty"]) == 1.0


def test_compare_page_streams_base_and_tuned_side_by_side(monkeypatch, runs, downloads):
    at = page(monkeypatch, runs[:1]).run()
    assert not at.exception, at.exception
    assert at.slider(key="temperature").value == 0.8 and at.slider(key="top_p").value == 0.95
    assert at.number_input(key="top_k").value == 50 and at.number_input(key="max_new_tokens").value == 100
    assert at.toggle(key="greedy").value is False
    at.number_input(key="max_new_tokens").set_value(12)
    generate(at)

    base, tuned = boxes(at, "base"), boxes(at, "tuned")
    assert [name for name, _ in base] == ["base"] and [name for name, _ in tuned] == ["tuned"]
    assert all(text and text != "generating…" for _, text in base + tuned)
    timings = [c.value for c in at.caption if c.value.startswith("first token")]
    assert len(timings) == 2 and all("tokens/s" in t and "total" in t for t in timings)
    # how each answer ended, as the report counts it: a base cut at 12 tokens must not pass for one that stopped
    endings = ("stopped by itself", "cut at the answer limit (12 tokens)", "cut where the model began a new turn")
    assert all(any(ending in t for ending in endings) for t in timings)
    assert at.expander[0].label == "Prompt the model saw"
    assert QUESTION in at.expander[0].code[0].value and "### Answer:" in at.expander[0].code[0].value

    csv_files = [d for d in downloads if d["mimetype"] == "text/csv"]
    rows = list(csv.DictReader(io.StringIO(csv_files[-1]["data"].decode("utf-8-sig"))))
    assert len(rows) == 1
    assert rows[0]["instruction"] == QUESTION and rows[0]["max_new_tokens"] == "12"
    assert rows[0]["base answer"] and rows[0]["tuned answer"] and float(rows[0]["tuned seconds"]) > 0
    assert int(rows[0]["tuned tokens"]) >= 1
    assert all(any(rows[0][f"{m} ended"].startswith(e) for e in endings) for m in ("base", "tuned"))
    assert at.query_params["prompt"] == QUESTION  # the address bar now links to this comparison


def test_switching_adapters_reuses_the_loaded_base(monkeypatch, runs, downloads):
    folders = [runs[1], runs[0]]  # as `affiner app` orders them: the latest first
    at = page(monkeypatch, folders).run()
    assert not at.exception, at.exception
    key = tuple(str(f) for f in folders)
    beta, alpha = model_names(folders)
    assert at.multiselect(key="models").value == [beta]  # the first (latest) run is shown by default
    at.toggle(key="greedy").set_value(True)
    at.number_input(key="max_new_tokens").set_value(8)
    generate(at)
    assert app.ENGINE_LOADS[key] == 1
    engine_id = at.session_state["engine_id"]
    assert [name for name, _ in boxes(at, "tuned")] == [beta]

    at.multiselect(key="models").set_value([alpha])
    generate(at, "Define FROND.")
    assert app.ENGINE_LOADS[key] == 1, "switching the adapter loaded the base model again"
    assert at.session_state["engine_id"] == engine_id
    assert [name for name, _ in boxes(at, "tuned")] == [alpha] and len(boxes(at, "base")) == 1

    at.multiselect(key="models").set_value([alpha, beta])
    generate(at, "Define MAPLE.")
    assert app.ENGINE_LOADS[key] == 1
    assert [name for name, _ in boxes(at, "tuned")] == [alpha, beta]
    rows = list(csv.DictReader(io.StringIO(downloads[-1]["data"].decode("utf-8-sig"))))
    assert [r["instruction"] for r in rows] == [QUESTION, "Define FROND.", "Define MAPLE."]
    assert rows[0][f"{alpha} answer"] == "" and rows[1][f"{alpha} answer"] and rows[2][f"{beta} answer"]
    assert {r["temperature"] for r in rows} == {"0.0"}


def test_a_link_opens_on_a_prompt_and_generates_once(monkeypatch, runs):
    at = page(monkeypatch, runs[:1])
    at.query_params.update(prompt=QUESTION, greedy="1", max_new_tokens="6", top_k="bad")
    at.run()
    assert not at.exception, at.exception
    assert at.text_area(key="instruction").value == QUESTION
    assert len(boxes(at, "base")) == 1 and len(boxes(at, "tuned")) == 1
    assert at.session_state["comparisons"][0]["settings"]["temperature"] == 0.0
    assert at.session_state["comparisons"][0]["settings"]["max_new_tokens"] == 6
    assert any("top_k" in w.value for w in at.warning)
    at.number_input(key="max_new_tokens").set_value(9).run()  # a rerun shows the answers again, without generating
    assert len(at.session_state["comparisons"]) == 1 and len(boxes(at, "tuned")) == 1


def test_a_link_with_a_greedy_value_it_cannot_read_says_so(monkeypatch, runs):
    at = page(monkeypatch, runs[:1])
    at.query_params.update(greedy="maybe", temperature="0.5")
    at.run()
    assert not at.exception, at.exception
    assert any("greedy='maybe'" in w.value for w in at.warning)  # not silently taken as "no"
    assert not at.session_state["greedy"] and at.session_state["temperature"] == 0.5
    at = page(monkeypatch, runs[:1])
    at.query_params.update(greedy="off")
    at.run()
    assert not at.warning and not at.session_state["greedy"]


def test_runs_page_shows_curves_config_and_report(monkeypatch, runs):
    at = page(monkeypatch, runs).run()
    at.text_area(key="instruction").input("Define GLINT.")
    at.sidebar.radio(key="page").set_value("Runs").run()
    assert not at.exception, at.exception
    assert [t.label for t in at.tabs] == model_names(runs)
    charts = at.tabs[1].get("vega_lite_chart")
    assert len(charts) == 2  # loss and learning rate against step
    assert "learning_rate" in str(charts[1].proto) and "step" in str(charts[0].proto)
    charts = at.tabs[0].get("vega_lite_chart")
    assert len(charts) == 4  # and alpha's held-out scores and loss, logged on some steps
    assert "eval_rouge_l" in str(charts[2].proto) and "eval_loss" in str(charts[3].proto)
    assert "lora:" in at.tabs[1].expander[0].code[0].value
    assert any("affiner evaluate" in i.value for i in at.tabs[0].info)  # alpha has no report yet
    assert not any("affiner evaluate" in i.value for i in at.tabs[1].info)  # beta has one
    assert "Report of beta" in str(at.tabs[1].get("iframe")[0].proto)
    at.sidebar.radio(key="page").set_value("Compare").run()
    assert not at.exception, at.exception
    assert at.text_area(key="instruction").value == "Define GLINT."  # kept while the other page was shown


def test_a_page_with_a_key_shows_nothing_until_it_is_given(monkeypatch, runs):
    at = page(monkeypatch, runs[:1], key="s3cret")
    at.query_params.update(prompt=QUESTION, greedy="1", max_new_tokens="4")  # a link that would generate at once
    at.run()
    assert not at.exception, at.exception
    shown = " ".join(e.value for e in [*at.markdown, *at.caption, *at.title] if isinstance(e.value, str))
    assert runs[0].name not in shown and "tuned" not in shown and not at.text_area and not at.sidebar.radio
    assert not boxes(at, "base") and "comparisons" not in at.session_state
    field = at.text_input(key="page_key")
    assert field.proto.type == field.proto.PASSWORD

    for wrong in ("s3cre", "s3crett", "S3CRET"):
        field.input(wrong).run()
        assert "Wrong key" in at.error[0].value and not at.text_area and not boxes(at, "base")
    at.text_input(key="page_key").input("s3cret").run()
    assert not at.exception, at.exception
    assert at.text_area(key="instruction").value == QUESTION  # the link's prompt, generated once unlocked
    assert len(boxes(at, "base")) == 1 and len(boxes(at, "tuned")) == 1
    at.number_input(key="max_new_tokens").set_value(5).run()
    assert at.text_area(key="instruction").value == QUESTION  # the session stays unlocked


def test_key_matches_only_the_whole_key():
    assert app.key_matches("s3cret", "s3cret") and app.key_matches(" s3cret\n", "s3cret")
    assert not any(app.key_matches(guess, "s3cret") for guess in ("", "s3cre", "s3crett", "S3CRET", "ß3cret"))


def test_page_reports_a_missing_run_instead_of_failing(monkeypatch, tmp_path):
    at = page(monkeypatch, [tmp_path / "nowhere"]).run()
    assert not at.exception
    assert "does not exist" in at.error[0].value


def test_the_fields_follow_the_runs_template(monkeypatch, runs, tmp_path, tiny_llama):
    at = page(monkeypatch, runs[:1]).run()  # a qa run: one question, no input of its own
    assert [(t.key, t.label) for t in at.text_area] == [("instruction", "Question")]
    at.button(key="generate").click().run()
    assert "Write a question first." in [w.value for w in at.warning]

    config = write_config(tmp_path, tiny_llama, "embedded:glossary-train.json", name="instructions",
                          data={"template": "alpaca"}, train={"max_steps": 1, "batch_size": 2})
    alpaca = train(load_config(str(config)))
    at = page(monkeypatch, [alpaca]).run()
    assert [(t.key, t.label) for t in at.text_area] == [("instruction", "Instruction"), ("input", "Input (optional)")]
    at.text_area(key="input").input("QUILT, FROND")
    at.number_input(key="max_new_tokens").set_value(4)
    generate(at, "Define the first acronym.")
    prompt = at.expander[0].code[0].value
    assert "### Instruction:" in prompt and "### Input:\nQUILT, FROND" in prompt


def test_generating_leaks_no_library_warning_into_the_terminal(monkeypatch, runs, capfd, tmp_path):
    from transformers.utils import logging as transformers_logging

    fresh = shutil.copytree(runs[0], tmp_path / "runs" / "delta")  # a new set of folders: the base is loaded here
    level = transformers_logging.get_verbosity()
    capfd.readouterr()
    at = page(monkeypatch, [fresh])
    at.query_params.update(prompt=QUESTION, temperature="0.7", top_k="5", max_new_tokens="6", seed="1")
    at.run()
    assert not at.exception, at.exception
    assert len(boxes(at, "tuned")) == 1
    out, err = capfd.readouterr()
    # AppTest runs the page without a server, and Streamlit says so; `affiner app` has a server.
    shown = [line for line in (out + err).splitlines() if "missing ScriptRunContext" not in line]
    assert not [line for line in shown if line.strip()], shown
    assert transformers_logging.get_verbosity() == level  # quiet while the page works, not for the whole process


def test_runs_page_shows_durations_and_paths_as_a_person_reads_them(monkeypatch, runs, tmp_path):
    copy = shutil.copytree(runs[0], tmp_path / "runs" / "gamma")
    write_json(copy / "run.json", {**read_json(copy / "run.json"), "train_seconds": 133.2})
    monkeypatch.chdir(tmp_path)
    at = page(monkeypatch, [copy]).run()
    at.sidebar.radio(key="page").set_value("Runs").run()
    assert not at.exception, at.exception
    facts = next(m.value for m in at.markdown if m.value.startswith("status"))
    assert "training 2 min 13 s" in facts and "133" not in facts
    assert facts.endswith("`runs/gamma`") and str(tmp_path) not in facts
    assert any("`affiner evaluate runs/gamma`" in i.value for i in at.info)


# ---------------------------------------------------------------------------------------- helpers


def test_answer_boxes_escape_the_model_text():
    box = app.answer_box("tuned", "<script>x</script>\n\nnext & last", name="a")
    assert "<script>" not in box and "&lt;script&gt;" in box and "<br><br>next &amp; last" in box
    assert 'data-testid="answer-tuned"' in box and "\n" not in box
    assert "generating" in app.answer_box("base", "", pending=True)


@pytest.mark.parametrize("seconds,shown", [(0.532, "0.53 s"), (4.26, "4.3 s"), (42.4, "42 s"), (59.6, "1 min 0 s"),
                                            (133.2, "2 min 13 s"), (3725, "1 h 02 min")])
def test_durations_read_as_a_person_says_them(seconds, shown):
    assert app.human_duration(seconds) == shown


def test_paths_are_shown_from_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert app.display_path(tmp_path / "project" / "runs" / "a", cwd=tmp_path / "project") == "runs/a"
    assert app.display_path(tmp_path / "home" / "runs" / "a", cwd=tmp_path / "project") == "~/runs/a"
    assert app.display_path(Path("/opt/runs/a"), cwd=tmp_path) == "/opt/runs/a"


def test_default_runs_are_the_latest_and_its_siblings(runs, tmp_path, tiny_gpt2):
    import yaml

    assert app.default_runs(runs[0].parent) == [runs[1], runs[0]]
    root = tmp_path / "runs"
    alpha, beta, other, unfinished = (shutil.copytree(runs[i], root / name) for i, name in
                                      ((0, "alpha"), (1, "beta"), (0, "other-base"), (1, "unfinished")))
    config = yaml.safe_load((other / "config.yaml").read_text(encoding="utf-8"))
    config["model"]["base"] = str(tiny_gpt2)
    (other / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    write_json(unfinished / "run.json", {**read_json(unfinished / "run.json"), "status": "training"})
    now = time.time()
    for age, folder in enumerate([unfinished, beta, other, alpha]):
        os.utime(folder, (now - 10 * age, now - 10 * age))
    assert app.default_runs(root) == [beta, alpha]  # not the other base, not the unfinished run
    with pytest.raises(AffinerError, match="does not share the base"):
        app.resolve_runs([alpha, other])
    with pytest.raises(AffinerError, match="has not finished training"):
        app.resolve_runs([unfinished])
    with pytest.raises(AffinerError, match="named twice"):
        app.resolve_runs([alpha, alpha])


def test_no_run_at_all_says_to_train_one_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    app_command.add_arguments(parser)
    with pytest.raises(AffinerError, match="affiner run"):
        app_command.main(parser.parse_args([]))


def test_main_serves_the_page_with_streamlit(runs, monkeypatch):
    launched = {}

    class FakeStreamlit:
        def __init__(self, command, env):
            launched.update(command=command, env=env)

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(app.subprocess, "Popen", FakeStreamlit)
    monkeypatch.chdir(runs[0].parents[1])
    parser = argparse.ArgumentParser()
    app_command.add_arguments(parser)
    app_command.main(parser.parse_args(["--port", "8600"]))  # no RUN: the latest and its siblings
    command = launched["command"]
    assert command[1:5] == ["-m", "streamlit", "run", PAGE]
    assert command[command.index("--server.headless") + 1] == "true"
    assert command[command.index("--server.port") + 1] == "8600"
    assert command[command.index("--server.address") + 1] == "127.0.0.1"
    assert command[command.index("--") + 1:] == [str(runs[1]), str(runs[0])]
    assert launched["env"][app.RUNS_ENV] == os.pathsep.join([str(runs[1]), str(runs[0])])

    monkeypatch.setattr(FakeStreamlit, "wait", lambda self, timeout=None: 1)
    with pytest.raises(AffinerError, match="--port"):
        app_command.main(parser.parse_args([str(runs[0])]))


def test_a_page_reachable_from_other_machines_needs_a_key(runs, monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(app.subprocess, "Popen", lambda command, env: launched.append((command, env)) or _Exited())
    monkeypatch.chdir(runs[0].parents[1])
    monkeypatch.delenv("AFFINER_TEST_KEY", raising=False)
    for host in ("0.0.0.0", "192.168.1.20", "::", ""):
        assert run_cli("app", "--host", host) == 2
        error = capsys.readouterr().err
        assert "without a key" in error and "--api-key-env" in error and error.count("\n") == 1
    assert run_cli("app", "--host", "0.0.0.0", "--api-key-env", "AFFINER_TEST_KEY") == 2
    assert "AFFINER_TEST_KEY" in capsys.readouterr().err
    assert launched == []  # refused before the page server started

    monkeypatch.setenv("AFFINER_TEST_KEY", "s3cret")
    assert run_cli("app", "--host", "0.0.0.0", "--api-key-env", "AFFINER_TEST_KEY") == 0
    command, env = launched[-1]
    assert env[app.KEY_ENV] == "s3cret" and not any("s3cret" in part for part in command)
    monkeypatch.setenv(app.KEY_ENV, "left over")
    assert run_cli("app") == 0  # loopback: keyless, as before
    assert app.KEY_ENV not in launched[-1][1]


class _Exited:
    def wait(self, timeout=None) -> int:
        return 0


# ---------------------------------------------------------------------------------------- a real browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, seconds: float, process: subprocess.Popen, log: Path) -> bytes:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server stopped:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read()
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"{url} did not answer within {seconds} s:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(process: subprocess.Popen | None) -> None:
    """End a process this test started, and its children (it leads its own process group)."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


READY = """(() => {
  const text = (kind) => [...document.querySelectorAll(`[data-testid="answer-${kind}"]`)].map(e => e.innerText.trim());
  const page = document.body ? document.body.innerText : "";  // polled from before the page has a body
  const timings = (page.match(/first token [0-9.]+ s/g) || []).length;
  return JSON.stringify({base: text("base"), tuned: text("tuned"), timings});
})()"""


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="headless Chromium is not installed (apt-get install chromium)")
def test_the_page_in_headless_chromium(runs, tmp_path):
    """The real server, a link that generates on open, Chromium driven over its DevTools protocol.

    Chromium's one-shot --screenshot/--dump-dom would shoot before the answers arrive (they come
    over Streamlit's websocket, which --virtual-time-budget does not wait for), so the test polls
    the DOM until both answers and their timings are shown, then takes the screenshot and the DOM.
    """
    from matplotlib.image import imread
    from websockets.sync.client import connect

    port, devtools_port = _free_port(), _free_port()
    log = tmp_path / "streamlit.log"
    env = {k: v for k, v in os.environ.items() if k != app.RUNS_ENV}  # the folders come as `-- RUN` here
    server = browser = None
    try:
        with open(log, "wb") as out:
            server = subprocess.Popen(app.streamlit_command(runs[:1], port=port, host="127.0.0.1"), env=env,
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for(f"http://127.0.0.1:{port}/", 60, server, log)
        url = f"http://127.0.0.1:{port}/?prompt=What%20does%20QUILT%20stand%20for%3F&greedy=1&max_new_tokens=24"
        browser = subprocess.Popen(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,1000",
             "--remote-debugging-address=127.0.0.1", f"--remote-debugging-port={devtools_port}", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        targets = json.loads(_wait_for(f"http://127.0.0.1:{devtools_port}/json/list", 30, browser, log))
        target = next(t for t in targets if t["type"] == "page")
        with connect(target["webSocketDebuggerUrl"], max_size=2**26, open_timeout=10) as devtools:
            ids = itertools.count(1)

            def call(method: str, **params) -> dict:
                number = next(ids)
                devtools.send(json.dumps({"id": number, "method": method, "params": params}))
                while True:
                    message = json.loads(devtools.recv(timeout=30))
                    if message.get("id") == number:
                        assert "error" not in message, message
                        return message["result"]

            deadline, shown = time.time() + 60, {}
            while time.time() < deadline:
                # While the page is still loading the script can throw: no value yet, keep polling.
                value = call("Runtime.evaluate", expression=READY, returnByValue=True)["result"].get("value")
                shown = json.loads(value) if value else {}
                if shown.get("timings", 0) >= 2:
                    break
                time.sleep(0.5)
            assert shown.get("timings", 0) >= 2, f"no answers in the page: {shown}\n{log.read_text()[-3000:]}"
            time.sleep(0.5)  # let the last paint land
            png = base64.b64decode(call("Page.captureScreenshot", format="png")["data"])
            dom = call("Runtime.evaluate", expression="document.documentElement.outerHTML",
                       returnByValue=True)["result"]["value"]
    finally:
        _stop(browser)
        _stop(server)

    terminal = log.read_text(errors="replace")  # what `affiner app` shows its user while the page generates
    assert not re.search(r"warn|Loading weights|Failed to load|deprecat", terminal, re.IGNORECASE), terminal
    (tmp_path / "page.png").write_bytes(png)
    (tmp_path / "page.html").write_text(dom, encoding="utf-8")
    assert len(shown["base"]) == 1 and len(shown["tuned"]) == 1
    assert shown["base"][0] and shown["tuned"][0] and "generating" not in shown["base"][0] + shown["tuned"][0]
    assert dom.count('data-testid="answer-base"') == 1 and dom.count('data-testid="answer-tuned"') == 1
    assert "Prompt the model saw" in dom and "Base and tuned, side by side" in dom

    pixels = imread(str(tmp_path / "page.png"))[..., :3] * 255
    assert pixels.shape[1] == 1400 and pixels.shape[0] >= 700, pixels.shape  # the viewport of the window
    assert pixels.std() > 10, "the screenshot is blank"
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    blueish = ((b - r > 15) & (b - g > 8)).sum()
    greenish = ((g - r > 10) & (g - b > 8)).sum()
    assert blueish > 5000, f"no blue-tinted base answer box in the screenshot ({blueish} pixels)"
    assert greenish > 5000, f"no green-tinted tuned answer box in the screenshot ({greenish} pixels)"


def test_a_terminated_affiner_app_stops_its_page_server_too():
    """kill (SIGTERM) reaches affiner alone, unlike a terminal's Ctrl-C: the page server must not stay on the port."""
    import sys
    import threading

    before = signal.getsignal(signal.SIGTERM)
    page_server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(SystemExit) as stopped:
            app.wait_for_page_server(page_server)
    finally:
        timer.cancel()
        page_server.kill()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert page_server.poll() == -signal.SIGTERM  # terminated by affiner, not by the clean-up above
    assert signal.getsignal(signal.SIGTERM) == before  # affiner's handler lasts as long as the page server


def test_a_hand_edited_metrics_row_is_left_out_of_the_curves_not_a_traceback(tmp_path):
    rows = [{"step": 1, "loss": 2.0}, {"step": "x", "loss": "NaN"}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curves = app.read_metrics(tmp_path)
    assert list(curves.index) == [1, 2] and list(curves["loss"]) == [2.0, 1.5]


def test_the_downloaded_csv_opens_with_its_accents_in_excel():
    comparison = {"instruction": "Été ?", "input": "", "settings": {}, "answers": {"tuned": {"text": "Oui, l'été.", "tokens": 4, "seconds": 0.5}}}
    data = app.comparisons_download([comparison])
    assert data.startswith(b"\xef\xbb\xbf")  # the byte-order mark Excel needs to read UTF-8
    assert next(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))["instruction"] == "Été ?"


def test_a_stopped_generation_keeps_what_was_said_under_its_own_question(monkeypatch, runs):
    """Streamlit's Stop ends the script mid-answer: the next run shows this question's partial answers, marked as
    cut, never the previous question's answers under it; the comparison is kept in the session's history."""
    from streamlit.runtime.scriptrunner_utils.exceptions import StopException

    real = app.generate_answer

    def stopped_on_tuned(engine, name, *args, reply=None, **kwargs):
        if name == "base":
            return real(engine, name, *args, reply=reply, **kwargs)
        reply.text, reply.tokens = " Partial", 1
        raise StopException()

    at = generate(page(monkeypatch, runs[:1]).run(), "What does QUILT stand for?")
    monkeypatch.setattr(app, "generate_answer", stopped_on_tuned)
    at.text_area(key="instruction").input("What does FROND stand for?")
    at.button(key="generate").click().run()
    monkeypatch.setattr(app, "generate_answer", real)
    comparisons = at.session_state["comparisons"]
    assert [c["instruction"] for c in comparisons] == ["What does QUILT stand for?", "What does FROND stand for?"]
    assert comparisons[-1]["answers"]["tuned"]["text"] == "Partial"
    assert comparisons[-1]["answers"]["tuned"]["ended"] == app.STOPPED
    at.toggle(key="greedy").set_value(not at.toggle(key="greedy").value).run()  # the next interaction
    assert [text for _, text in boxes(at, "tuned")] == ["Partial"]
    assert any(app.STOPPED in c.value for c in at.caption)
