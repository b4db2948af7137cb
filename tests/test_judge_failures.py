"""A judge that fails or cannot be read: the answers it leaves unjudged are counted with their reasons in
metrics.json, the terminal table and both reports, and `affiner evaluate` exits 3 once everything is
written; evaluate's number flags are checked before anything runs."""

from __future__ import annotations

import json

import pytest
from fake_endpoint import FakeServer, Reply, running_server

from affiner.core.endpoint import EndpointSettings
from affiner.core.errors import Incomplete
from affiner.evaluation.evaluate import require_judged
from affiner.evaluation.judge import Judge, PairVerdict, Verdict, unjudged
from affiner.evaluation.report_content import unjudged_notes
from affiner.evaluation.report_html import render_html
from affiner.evaluation.report_markdown import render_markdown
from affiner.evaluation.table import format_table
from conftest import run_cli

NOT_FOUND = b'{"error": {"message": "model stand-in not found"}}'
OK = "<result>1</result><explain>It matches.</explain>"


@pytest.fixture
def server():
    with running_server() as srv:
        yield srv


def make_judge(server: FakeServer, tmp_path) -> Judge:
    return Judge(EndpointSettings(url=server.url, model="stand-in", cache_dir=tmp_path / "cache", backoff=0.001))


def question_of(body: dict) -> str:
    return body["messages"][-1]["content"].split("<question>\n", 1)[1].split("\n</question>", 1)[0]


def verdict_for(body: dict) -> Reply:
    """A readable verdict in either mode: absolute prompts get "correct", pairwise ones "tie"."""
    return Reply("<result>tie</result>" if "<answer_A>" in body["messages"][-1]["content"] else OK)


# ---------------------------------------------------------------------------------------- counting and reasons


def test_unjudged_counts_failures_and_unreadable_replies_with_their_reasons(server, tmp_path):
    def grade(body: dict) -> Reply:
        question = question_of(body)
        if question.startswith("gone"):
            return Reply(status=404, body=NOT_FOUND)
        return Reply("I would rather not say." if question.startswith("shy") else OK)

    server.behaviour = grade
    questions = ["ok-1", "gone-1", "shy-1", "gone-2", "ok-2", "gone-3"]
    verdicts = make_judge(server, tmp_path).absolute([(q, "ref", "answer") for q in questions])
    summary = unjudged(verdicts)
    assert summary["unjudged"] == 4
    [failed, unreadable] = summary["reasons"]  # the most common reason first
    assert failed["count"] == 3 and "HTTP 404" in failed["reason"] and "stand-in not found" in failed["reason"]
    assert unreadable == {"reason": "no verdict in the judge's reply, e.g. 'I would rather not say.'", "count": 1}


def test_reasons_are_shortened_and_at_most_three():
    verdicts = [Verdict(None, "", "", error=f"error {i}: " + "x" * 500) for i in range(5)] + [Verdict(1, "", OK)]
    summary = unjudged(verdicts)
    assert summary["unjudged"] == 5 and len(summary["reasons"]) == 3
    assert all(len(r["reason"]) <= 160 and r["count"] == 1 for r in summary["reasons"])
    [note] = unjudged_notes({"absolute": {"tuned": {"judged": 6, **summary}}})
    assert note.startswith("5 of 6 tuned answers unjudged: error 0: xxx") and note.endswith("2 for other reasons")


def test_pairwise_failing_in_both_orders_reads_once(server, tmp_path):
    server.behaviour = lambda body: Reply(status=404, body=NOT_FOUND)
    [verdict] = make_judge(server, tmp_path).pairwise([("q", "ref", "base", "tuned")])
    assert verdict.winner is None and verdict.error.count("HTTP 404") == 1
    assert unjudged([verdict, PairVerdict("tie", (OK, OK))])["reasons"] == [{"reason": verdict.error, "count": 1}]


# ---------------------------------------------------------------------------------------- what the user reads


def _evaluation(judge: dict) -> dict:
    answer = {"text": "Paris", "stopped": True, "tokens": 1, "scores": {"contains": 1.0}}
    return {"title": "t", "models": ["base", "tuned"], "primary_metric": "contains", "settings": {},
            "metric_info": {"contains": {"label": "contains the reference", "higher_is_better": True, "kind": "rate"}},
            "metrics": {"contains": {"base": {"mean": 1.0}, "tuned": {"mean": 1.0}}}, "judge": judge,
            "examples": [{"question": "Capital?", "input": "", "reference": "Paris",
                          "answers": {"base": answer, "tuned": answer}}]}


FAILED_JUDGE = {"model": "stand-in",
                "absolute": {"base": {"judged": 5, "failed": 0, "unparseable": 0, "unjudged": 0, "reasons": []},
                             "tuned": {"judged": 5, "failed": 4, "unparseable": 0, "unjudged": 4,
                                       "reasons": [{"reason": "HTTP 503 <Service Unavailable>", "count": 4}]}},
                "pairwise": {"tuned": {"judged": 5, "failed": 1, "unparseable": 1, "unjudged": 2,
                                       "reasons": [{"reason": "HTTP 503 <Service Unavailable>", "count": 1},
                                                   {"reason": "no verdict in the judge's reply", "count": 1}]}}}


def test_table_and_reports_say_how_many_answers_are_unjudged_and_why():
    evaluation = _evaluation(FAILED_JUDGE)
    absolute = "4 of 5 tuned answers unjudged: HTTP 503 <Service Unavailable>"
    pairwise = ("2 of 5 tuned vs base answer pairs unjudged: HTTP 503 <Service Unavailable> (1); "
                "no verdict in the judge's reply (1)")
    assert f"Judge: {absolute}" in format_table(evaluation) and pairwise in format_table(evaluation)
    assert "base answers unjudged" not in format_table(evaluation)
    markdown = render_markdown(evaluation)
    assert "4 of 5 tuned answers unjudged: HTTP 503 &lt;Service Unavailable>" in markdown
    assert "| tuned | - | - | - | - | 1 | 1 |" in markdown  # the pairwise table has its failed column
    page = render_html(evaluation, {})
    assert "4 of 5 tuned answers unjudged: HTTP 503 &lt;Service Unavailable&gt;" in page
    assert "no verdict in the judge&#x27;s reply (1)" in page


def test_an_older_metrics_json_without_reasons_still_reports_its_counts():
    notes = unjudged_notes({"absolute": {"tuned": {"judged": 5, "failed": 1, "unparseable": 2}}})
    assert notes == ["3 of 5 tuned answers unjudged: request failed (1); no verdict in the judge's reply (2)"]


def test_require_judged_raises_incomplete_only_when_verdicts_are_missing(tmp_path):
    complete = json.loads(json.dumps(FAILED_JUDGE))
    complete["absolute"]["tuned"].update(unjudged=0, failed=0, reasons=[])
    complete["pairwise"] = {}
    require_judged(_evaluation(complete), tmp_path / "report.html", "affiner evaluate runs/a")
    require_judged(_evaluation(None), tmp_path / "report.html", "affiner evaluate runs/a")
    with pytest.raises(Incomplete) as raised:
        require_judged(_evaluation(FAILED_JUDGE), tmp_path / "report.html", "affiner evaluate runs/a")
    message = str(raised.value)
    assert raised.value.exit_code == 3 and "\n" not in message
    assert "could not judge 6 of 15" in message and "absolute tuned: 4 of 5 answers" in message
    assert "5 of them because: HTTP 503 <Service Unavailable>" in message
    assert "`affiner evaluate runs/a`" in message and str(tmp_path / "report.html") in message


# ---------------------------------------------------------------------------------------- the command


@pytest.fixture
def adapter(tmp_path, tiny_gpt2):
    """A bare peft LoRA folder for the tiny GPT-2: evaluating it needs no training."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_gpt2),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "my-lora")
    return tmp_path / "my-lora"


def test_evaluate_writes_everything_then_exits_3_and_a_rerun_asks_only_the_missing(
        server, tmp_path, tiny_gpt2, adapter, qa_file, capsys, monkeypatch):
    monkeypatch.setenv("AFFINER_CACHE", str(tmp_path / "cache"))
    broken = ("What does QUILT stand for?", "What does FROND stand for?")
    server.behaviour = lambda body: (Reply(status=404, body=NOT_FOUND) if question_of(body) in broken
                                     else verdict_for(body))
    out = tmp_path / "eval"
    argv = ["evaluate", "--base", str(tiny_gpt2), "--adapter", str(adapter), "--test", str(qa_file), "--template",
            "qa", "--output", str(out), "--max-new-tokens", "4", "--judge-url", server.url, "--judge-model", "stand-in"]
    assert run_cli(*argv) == 3
    captured = capsys.readouterr()
    saved = json.loads((out / "metrics.json").read_text())["judge"]
    for mode, model in (("absolute", "base"), ("absolute", "my-lora"), ("pairwise", "my-lora")):
        summary = saved[mode][model]
        assert summary["unjudged"] == summary["failed"] == 2 and summary["judged"] == 6
        assert [r["count"] for r in summary["reasons"]] == [2] and "HTTP 404" in summary["reasons"][0]["reason"]
    assert "2 of 6 my-lora answers unjudged: HTTP 404" in captured.out
    for report in ("report.md", "report.html"):
        assert "2 of 6 my-lora answers unjudged: HTTP 404" in (out / report).read_text()
    assert "could not judge 6 of 18" in captured.err and "stand-in not found" in captured.err
    assert f"--judge-endpoint {server.url} --judge-model stand-in" in captured.err and "Traceback" not in captured.err

    asked_before = server.attempts
    server.behaviour = verdict_for
    assert run_cli(*argv) == 0
    again = [question_of(body) for _, body in server.requests[asked_before:]]
    assert again and set(again) <= set(broken)  # verdicts already given came from the cache


@pytest.mark.parametrize("flag, value", [("--max-new-tokens", "0"), ("--max-questions", "0"), ("--batch-size", "-1"),
                                         ("--temperature", "-0.5"), ("--top-p", "0"), ("--top-p", "1.5"),
                                         ("--top-k", "-1"), ("--seed", "-3"), ("--batch-size", "four")])
def test_evaluate_refuses_number_flags_out_of_range(flag, value, capsys):
    assert run_cli("evaluate", "runs/a", flag, value) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and value in err and "Traceback" not in err
