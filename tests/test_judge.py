"""The judge client against a scripted OpenAI-compatible server on 127.0.0.1: verdicts, retries,
timeouts, concurrency, cache and API key handling, plus the tolerant reply parsers."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler

import pytest
from fake_endpoint import FakeServer, Reply, running_server

from affiner.core.endpoint import EndpointSettings as JudgeSettings
from affiner.core.errors import AffinerError
from affiner.evaluation.judge import (
    Judge,
    PairVerdict,
    Verdict,
    parse_absolute,
    parse_pairwise,
    summarise_absolute,
    summarise_pairwise,
)


@pytest.fixture
def server():
    with running_server() as srv:
        yield srv


def make_judge(server: FakeServer, tmp_path, **overrides) -> Judge:
    settings = dict(url=server.url, model="judge-test", cache_dir=tmp_path / "cache", backoff=0.001, timeout=5.0)
    return Judge(JudgeSettings(**(settings | overrides)))


def user_text(body: dict) -> str:
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


def block(body: dict, tag: str) -> str:
    return re.search(rf"<{tag}>\n(.*?)\n</{tag}>", user_text(body), re.DOTALL).group(1)


# ---------------------------------------------------------------------------------------- absolute mode


def test_absolute_well_formed_and_summary(server, tmp_path):
    def grade(body: dict) -> Reply:
        question, candidate = block(body, "question"), block(body, "candidate")
        if question == "q-unparseable":
            return Reply("I am not sure what to say here.")
        if question == "q-refused":
            return Reply(status=400, body=b'{"error": "bad request"}')
        if candidate == block(body, "reference"):
            return Reply("<result>1</result>\n<explain>Same facts as the reference.</explain>")
        return Reply("<result>0</result>\n<explain>It contradicts the reference.</explain>")

    server.behaviour = grade
    items = [("q1", "Paris", "Paris"), ("q2", "Rome", "Rome"), ("q3", "Oslo", "Bergen"), ("q4", "Bern", "Bern"),
             ("q-unparseable", "x", "y"), ("q-refused", "x", "y")]
    verdicts = make_judge(server, tmp_path).absolute(items)

    assert [v.score for v in verdicts] == [1, 1, 0, 1, None, None]
    assert verdicts[0] == Verdict(1, "Same facts as the reference.",
                                  "<result>1</result>\n<explain>Same facts as the reference.</explain>")
    assert verdicts[2].reason == "It contradicts the reference."
    assert verdicts[4].error is None and verdicts[4].raw == "I am not sure what to say here."
    assert "400" in verdicts[5].error and verdicts[5].raw == ""
    assert summarise_absolute(verdicts) == {"judged": 6, "parsed": 4, "unparseable": 1, "failed": 1,
                                            "accuracy": 3 / 4}
    headers, body = server.requests[0]
    assert body["model"] == "judge-test" and body["temperature"] == 0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "Authorization" not in headers


def test_summaries_of_nothing():
    assert summarise_absolute([]) == {"judged": 0, "parsed": 0, "unparseable": 0, "failed": 0, "accuracy": None}
    assert summarise_pairwise([])["win_rate"] is None


def test_empty_batch_makes_no_request(server, tmp_path):
    judge = make_judge(server, tmp_path)
    assert judge.absolute([]) == [] and judge.pairwise([]) == []
    assert server.attempts == 0


# ---------------------------------------------------------------------------------------- pairwise mode


def prefer(marker: str) -> Callable[[dict], Reply]:
    """A judge that picks whichever answer contains `marker`, wherever it is shown."""
    def pick(body: dict) -> Reply:
        letter = "A" if marker in block(body, "answer_A") else "B"
        return Reply(f"<result>{letter}</result><explain>{letter} is right.</explain>")
    return pick


def test_pairwise_consistent_preference_wins(server, tmp_path):
    server.behaviour = prefer("TUNED")
    [verdict] = make_judge(server, tmp_path).pairwise([("q", "ref", "base says BASE", "tuned says TUNED")])
    assert verdict == PairVerdict("tuned", ("<result>B</result><explain>B is right.</explain>",
                                            "<result>A</result><explain>A is right.</explain>"))
    first, second = (body for _, body in server.requests)
    orders = {(block(b, "answer_A"), block(b, "answer_B")) for b in (first, second)}
    assert orders == {("base says BASE", "tuned says TUNED"), ("tuned says TUNED", "base says BASE")}


def test_pairwise_position_bias_is_a_tie(server, tmp_path):
    server.behaviour = lambda body: Reply("<result>A</result>")  # always the first answer shown
    [verdict] = make_judge(server, tmp_path).pairwise([("q", "ref", "base", "tuned")])
    assert verdict.winner == "tie" and verdict.error is None


def test_pairwise_summary_by_hand(server, tmp_path):
    def judge_by_question(body: dict) -> Reply:
        question = block(body, "question")
        if question.startswith("tuned"):
            return prefer("TUNED")(body)
        if question == "base":
            return prefer("BASE")(body)
        if question == "tie":
            return Reply("<result>tie</result>")
        if question == "half":  # tuned in one order, unreadable in the other
            return Reply("<result>A</result>" if "TUNED" in block(body, "answer_A") else "Both are fine.")
        return Reply(status=401, body=b'{"error": "unauthorized"}')

    server.behaviour = judge_by_question
    items = [(q, "ref", "BASE", "TUNED") for q in ("tuned-1", "tuned-2", "base", "tie", "half", "fails")]
    verdicts = make_judge(server, tmp_path).pairwise(items)

    assert [v.winner for v in verdicts] == ["tuned", "tuned", "base", "tie", None, None]
    assert verdicts[4].error is None and verdicts[5].error is not None and "401" in verdicts[5].error
    # 4 parsed verdicts: 2 wins, 1 loss, 1 tie -> (2 + 0.5) / 4
    assert summarise_pairwise(verdicts) == {"judged": 6, "parsed": 4, "unparseable": 1, "failed": 1, "wins": 2,
                                            "losses": 1, "ties": 1, "win_rate": 0.625}


# ---------------------------------------------------------------------------------------- malformed replies


@pytest.mark.parametrize("payload", [b"<html>502 bad gateway</html>", b'{"object": "chat.completion"}',
                                     b'{"choices": []}', b'{"choices": [{"message": {"content": null}}]}'])
def test_malformed_body_is_retried_then_an_error(server, tmp_path, payload):
    server.behaviour = lambda body: Reply(body=payload)
    [verdict] = make_judge(server, tmp_path, max_retries=2).absolute([("q", "r", "a")])
    assert server.attempts == 3
    assert verdict.score is None and verdict.raw == ""
    assert "3 attempts" in verdict.error
    assert "not a chat completion" in verdict.error or "no text content" in verdict.error
    assert summarise_absolute([verdict])["failed"] == 1


def test_malformed_body_then_good_reply(server, tmp_path):
    server.script = [Reply(body=b"not json at all")]
    [verdict] = make_judge(server, tmp_path).absolute([("q", "r", "a")])
    assert verdict.score == 1 and verdict.error is None and server.attempts == 2


def test_reply_without_verdict_is_unparseable_not_guessed(server, tmp_path):
    replies = iter(["The answer looks correct to me.", "<result>maybe</result>",
                    "<result>1</result> or <result>0</result>", ""])
    lock = threading.Lock()

    def next_text(body: dict) -> Reply:
        with lock:
            return Reply(next(replies))

    server.behaviour = next_text
    verdicts = make_judge(server, tmp_path, concurrency=1).absolute([(f"q{i}", "r", "a") for i in range(4)])
    assert [v.score for v in verdicts] == [None] * 4
    assert all(v.error is None for v in verdicts)
    assert summarise_absolute(verdicts) == {"judged": 4, "parsed": 0, "unparseable": 4, "failed": 0,
                                            "accuracy": None}


# ---------------------------------------------------------------------------------------- slow and failing servers


def test_slow_first_reply_is_retried(server, tmp_path):
    server.script = [Reply(delay=1.0)]
    started = time.monotonic()
    [verdict] = make_judge(server, tmp_path, timeout=0.3).absolute([("q", "r", "a")])
    assert verdict.score == 1 and verdict.error is None
    assert server.attempts == 2
    assert time.monotonic() - started < 1.0  # it did not wait for the slow reply


def test_always_slow_gives_up_after_all_attempts(server, tmp_path):
    server.behaviour = lambda body: Reply(delay=0.6)
    [verdict] = make_judge(server, tmp_path, timeout=0.2, max_retries=2).absolute([("q", "r", "a")])
    assert verdict.score is None
    assert "3 attempts" in verdict.error and "0.2 s" in verdict.error
    assert server.attempts == 3


def test_server_errors_then_success(server, tmp_path):
    server.script = [Reply(status=500, body=b"oops"), Reply(status=503, body=b"busy")]
    [verdict] = make_judge(server, tmp_path).absolute([("q", "r", "a")])
    assert verdict.score == 1 and verdict.error is None
    assert server.attempts == 3


def test_rate_limit_is_retried(server, tmp_path):
    server.script = [Reply(status=429, body=b'{"error": "slow down"}')]
    [verdict] = make_judge(server, tmp_path).absolute([("q", "r", "a")])
    assert verdict.score == 1 and server.attempts == 2


def test_backoff_doubles(server, tmp_path):
    server.behaviour = lambda body: Reply(status=500, body=b"down")
    started = time.monotonic()
    make_judge(server, tmp_path, backoff=0.1, max_retries=2).absolute([("q", "r", "a")])
    assert time.monotonic() - started >= 0.1 + 0.2
    assert server.attempts == 3


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_are_not_retried(server, tmp_path, status):
    server.behaviour = lambda body: Reply(status=status, body=b'{"error": {"message": "model judge-test not found"}}')
    [verdict] = make_judge(server, tmp_path).absolute([("q", "r", "a")])
    assert server.attempts == 1
    assert verdict.score is None and f"HTTP {status}" in verdict.error
    assert "not found" in verdict.error  # the server's own explanation is kept


def test_unreachable_server_is_an_error(tmp_path):
    from http.server import HTTPServer

    with HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as closed:
        port = closed.server_address[1]  # bound, then closed: nothing listens there afterwards
    judge = Judge(JudgeSettings(url=f"http://127.0.0.1:{port}/v1", model="m", cache_dir=tmp_path, backoff=0.001,
                                max_retries=1))
    [verdict] = judge.absolute([("q", "r", "a")])
    assert verdict.score is None and "2 attempts" in verdict.error and str(port) in verdict.error


def test_environment_proxy_is_bypassed_for_loopback(server, tmp_path, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    [verdict] = make_judge(server, tmp_path, max_retries=0).absolute([("q", "r", "a")])
    assert verdict.score == 1 and server.attempts == 1


# ---------------------------------------------------------------------------------------- concurrency


def test_concurrency_limit_and_input_order(server, tmp_path):
    def slow_echo(body: dict) -> Reply:
        number = int(block(body, "question").removeprefix("question "))
        # Earlier questions answer more slowly, so completion order differs from input order.
        return Reply(f"<result>{number % 2}</result><explain>item {number}</explain>", delay=0.02 * (10 - number))

    server.behaviour = slow_echo
    verdicts = make_judge(server, tmp_path, concurrency=2).absolute([(f"question {i}", "r", "a") for i in range(10)])
    assert [v.reason for v in verdicts] == [f"item {i}" for i in range(10)]
    assert [v.score for v in verdicts] == [i % 2 for i in range(10)]
    assert server.max_in_flight == 2


def test_identical_items_in_one_batch_are_asked_once(server, tmp_path):
    verdicts = make_judge(server, tmp_path).absolute([("q", "r", "a")] * 3 + [("q2", "r", "a")])
    assert len(verdicts) == 4 and all(v.score == 1 for v in verdicts)
    assert server.attempts == 2


# ---------------------------------------------------------------------------------------- cache


def test_cache_avoids_repeated_requests(server, tmp_path):
    items = [("q1", "r", "a"), ("q2", "r", "b")]
    first = make_judge(server, tmp_path).absolute(items)
    assert server.attempts == 2
    again = make_judge(server, tmp_path).absolute(items)  # a new Judge: the cache is on disk
    assert again == first and server.attempts == 2
    make_judge(server, tmp_path).absolute([("q1 changed", "r", "a")])
    assert server.attempts == 3
    make_judge(server, tmp_path, model="another-judge").absolute(items[:1])
    assert server.attempts == 4


def test_failures_are_not_cached(server, tmp_path):
    server.script = [Reply(status=401, body=b"no")]
    [failed] = make_judge(server, tmp_path).absolute([("q", "r", "a")])
    assert failed.error is not None
    [verdict] = make_judge(server, tmp_path).absolute([("q", "r", "a")])
    assert verdict.score == 1 and server.attempts == 2


def test_default_cache_dir_follows_affiner_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("AFFINER_CACHE", str(tmp_path / "root"))
    Judge(JudgeSettings(url=server.url, model="m")).absolute([("q", "r", "a")])
    assert list((tmp_path / "root" / "judge").iterdir())


# ---------------------------------------------------------------------------------------- API key and settings


SECRET = "sk-test-Zq8x1-very-secret"


def test_api_key_is_sent_and_never_stored(server, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    # A careless server that echoes the Authorization header in its error body.
    server.script = [Reply(status=401, body=f'{{"error": "bad key Bearer {SECRET}"}}'.encode())]
    judge = make_judge(server, tmp_path, api_key_env="JUDGE_TEST_KEY")
    verdicts = judge.absolute([("q1", "r", "a"), ("q2", "r", "a")])
    pairs = judge.pairwise([("q3", "r", "base", "tuned")])

    assert {headers["Authorization"] for headers, _ in server.requests} == {f"Bearer {SECRET}"}
    failed = next(v for v in verdicts if v.error)
    assert "401" in failed.error and "[api key]" in failed.error
    for text in [repr(verdicts), repr(pairs), repr(judge), repr(judge.settings)]:
        assert SECRET not in text
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert SECRET.encode() not in path.read_bytes()


def test_redirects_are_refused_so_the_key_never_follows_one(server, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    with running_server() as elsewhere:
        target = elsewhere.url + "/chat/completions"
        server.behaviour = lambda body: Reply(status=307, body=b"", headers={"Location": target})
        [verdict] = make_judge(server, tmp_path, api_key_env="JUDGE_TEST_KEY").absolute([("q", "r", "a")])
        assert elsewhere.attempts == 0 and server.attempts == 1  # not followed, not retried
    assert "HTTP 307" in verdict.error and "redirects are refused" in verdict.error and target in verdict.error


def test_openai_variables_of_the_environment_are_never_sent(server, tmp_path, monkeypatch):
    """openai reads these for api.openai.com; a judge elsewhere must not receive them."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-of-the-environment")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-of-the-environment")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-of-the-environment")
    monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", "X-Custom: custom-of-the-environment")
    [verdict] = make_judge(server, tmp_path).absolute([("q", "r", "a")])
    [(headers, _)] = server.requests
    assert verdict.score == 1 and headers["User-Agent"] == "affiner-judge"
    assert "authorization" not in {name.lower() for name in headers}
    assert not [value for value in headers.values() if "of-the-environment" in value]


def test_missing_api_key_variable_is_a_user_error(server, tmp_path, monkeypatch):
    monkeypatch.delenv("JUDGE_ABSENT_KEY", raising=False)
    with pytest.raises(AffinerError, match="JUDGE_ABSENT_KEY"):
        make_judge(server, tmp_path, api_key_env="JUDGE_ABSENT_KEY")
    monkeypatch.setenv("JUDGE_ABSENT_KEY", "  ")
    with pytest.raises(AffinerError, match="JUDGE_ABSENT_KEY"):
        make_judge(server, tmp_path, api_key_env="JUDGE_ABSENT_KEY")
    assert server.attempts == 0


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/v1", "127.0.0.1:11434/v1", "http://", ""])
def test_bad_url_is_a_user_error(tmp_path, url):
    with pytest.raises(AffinerError, match="http:// or https://"):
        Judge(JudgeSettings(url=url, model="m", cache_dir=tmp_path))


@pytest.mark.parametrize("override", [{"concurrency": 0}, {"max_retries": -1}, {"timeout": 0}, {"model": " "}])
def test_bad_settings_are_user_errors(server, tmp_path, override):
    with pytest.raises(AffinerError):
        make_judge(server, tmp_path, **override)


def test_trailing_slash_in_url(server, tmp_path):
    [verdict] = make_judge(server, tmp_path, url=server.url + "/").absolute([("q", "r", "a")])
    assert verdict.score == 1


# ---------------------------------------------------------------------------------------- parsers


@pytest.mark.parametrize("text, expected", [
    ("<result>1</result><explain>Right.</explain>", (1, "Right.")),
    ("<result>0</result>\n<explain>Wrong date.</explain>", (0, "Wrong date.")),
    ("<Result> 1 </Result>", (1, "")),
    ("<RESULT>\n0\n</RESULT>", (0, "")),
    ("<result>1\n<explain>No closing tag.</explain>", (1, "No closing tag.")),
    ("<result>0", (0, "")),
    ("<result>**1**</result>", (1, "")),
    ("```xml\n<result>1</result>\n<explain>In a fence.</explain>\n```", (1, "In a fence.")),
    ("Result: 1", (1, "")),
    ("**Result:** 0\nThe date is wrong.", (0, "")),
    ("result = 1", (1, "")),
    ("1", (1, "")),
    (" 0.\n", (0, "")),
    ("**1**", (1, "")),
    ("`0`", (0, "")),
    ("1\n<explain>Bare value first.</explain>", (1, "Bare value first.")),
    ("<explain>Reason first.</explain><result>0</result>", (0, "Reason first.")),
    ("<explain>  spread\n over   lines </explain><result>1</result>", (1, "spread over lines")),
    ("<think>Maybe <result>0</result>? No.</think><result>1</result>", (1, "")),
    ("<result>1</result><result>1</result>", (1, "")),
])
def test_parse_absolute_tolerant_forms(text, expected):
    assert parse_absolute(text) == expected


@pytest.mark.parametrize("text", [
    "", "The answer is correct.", "yes", "10", "2", "1 0", "<result>yes</result>", "<result></result>",
    "<result>1</result> <result>0</result>", "Result: correct", "Result: 1 or 0", "<result>1 because it matches",
    "Score 1/1", "<think>1</think>", "The result: probably 1",
])
def test_parse_absolute_rejects(text):
    assert parse_absolute(text)[0] is None


@pytest.mark.parametrize("text, expected", [
    ("<result>A</result><explain>A is right.</explain>", "A"),
    ("<result>B</result>", "B"),
    ("<result>tie</result>", "tie"),
    ("<Result> TIE </Result>", "tie"),
    ("<result> b ", "B"),
    ("<result>Answer A</result>", "A"),
    ("Result: B", "B"),
    ("**Verdict**: Tie", "tie"),
    ("A", "A"),
    ("**B**", "B"),
    ("B.\n<explain>Shorter.</explain>", "B"),
])
def test_parse_pairwise_tolerant_forms(text, expected):
    assert parse_pairwise(text) == expected


@pytest.mark.parametrize("text", [
    "", "Both are good.", "C", "AB", "<result>A or B</result>", "<result>A</result><result>B</result>",
    "Result: a tie", "1", "Answer A is better", "<result>both</result>",
])
def test_parse_pairwise_rejects(text):
    assert parse_pairwise(text) is None


def test_the_judge_sees_the_tasks_input_as_the_report_shows_it(server, tmp_path):
    from affiner.core.config import JudgeConfig
    from affiner.core.templates import Example
    from affiner.evaluation.generation import Answer
    from affiner.evaluation.judge import judge_answers

    server.behaviour = lambda body: Reply("<result>1</result>\n<explain>Same meaning.</explain>")
    example = Example(instruction="Translate into French.", input="Good morning", response="Bonjour")
    judge_answers(make_judge(server, tmp_path), JudgeConfig(url=server.url, model="judge-test", mode="absolute"),
                  [example], {"base": [Answer("Bonjour", True, 1)]}, {"base": [{}]})
    assert block(server.requests[0][1], "question") == "Translate into French.\n\nInput: Good morning"


def test_judge_flags_override_the_runs_judge_key_by_key():
    """--judge-mode alone keeps the run's endpoint and model; --judge-endpoint alone keeps its model and
    concurrency (each flag replaced the whole eval.judge: the mode was ignored, the model asked for again)."""
    from affiner.core.config import JudgeConfig
    from affiner.evaluation.evaluate import judge_settings_over

    recorded = JudgeConfig(url="http://127.0.0.1:9/v1", model="judge-m", mode="both", concurrency=2)
    assert judge_settings_over(recorded, {}) is recorded
    moded = judge_settings_over(recorded, {"mode": "absolute"})
    assert (moded.url, moded.model, moded.mode, moded.concurrency) == ("http://127.0.0.1:9/v1", "judge-m", "absolute", 2)
    moved = judge_settings_over(recorded, {"url": "http://127.0.0.1:8/v1"})
    assert (moved.url, moved.model, moved.concurrency) == ("http://127.0.0.1:8/v1", "judge-m", 2)
    assert judge_settings_over(None, {"mode": "absolute"}) is None  # no endpoint anywhere: no judge
    assert judge_settings_over(None, {"url": "http://x/v1", "model": "m"}).model == "m"
