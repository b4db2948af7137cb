"""The judge asks for its verdict as JSON by a schema (structured output), reads it by that schema, and falls back
to the text form: for a server that ignores response_format, and, after one refusal, for one that refuses it."""

from __future__ import annotations

import json
import threading

import pytest
from fake_endpoint import FakeServer, Reply, running_server

from affiner.core.endpoint import ChatClient, EndpointSettings
from affiner.evaluation.judge import (
    ABSOLUTE_FORMAT,
    NO_STRUCTURED_OUTPUT,
    PAIRWISE_FORMAT,
    Judge,
    PairVerdict,
    absolute_messages,
    parse_absolute,
    parse_pairwise,
)


@pytest.fixture
def server():
    with running_server() as srv:
        yield srv


def settings(server: FakeServer, tmp_path, **overrides) -> EndpointSettings:
    return EndpointSettings(**{"url": server.url, "model": "judge-test", "cache_dir": tmp_path / "cache",
                               "backoff": 0.001, "timeout": 5.0} | overrides)


def question(body: dict) -> str:
    return body["messages"][-1]["content"].split("<question>\n", 1)[1].split("\n</question>", 1)[0]


def grade(body: dict) -> Reply:
    """Correct when the candidate repeats the reference: the text form, which an honouring server turns into JSON."""
    user = body["messages"][-1]["content"]
    same = user.split("<reference>\n")[1].split("\n</reference>")[0] == user.split("<candidate>\n")[1].split("\n</")[0]
    return Reply(f"<result>{int(same)}</result><explain>{'Same' if same else 'Other'} facts.</explain>")


def with_format(server: FakeServer) -> list[dict]:
    return [body for _, body in server.requests if "response_format" in body]


# ---------------------------------------------------------------------------------------- a server that honours it


def test_structured_verdicts_are_asked_for_and_read(server, tmp_path, capsys):
    server.structured_output, server.behaviour = "honour", grade
    judge = Judge(settings(server, tmp_path))
    verdicts = judge.absolute([("q1", "Paris", "Paris"), ("q2", "Oslo", "Bergen")])
    assert [(v.score, v.reason, v.error) for v in verdicts] == [(1, "Same facts.", None), (0, "Other facts.", None)]
    assert json.loads(verdicts[0].raw) == {"result": 1, "explain": "Same facts."}  # JSON came back, and was read

    server.behaviour = lambda body: Reply("<result>B</result><explain>B is right.</explain>")
    [pair] = judge.pairwise([("q3", "ref", "base", "tuned")])
    assert pair.winner == "tie" and all(json.loads(raw)["result"] == "B" for raw in pair.raw)  # B, then B: position

    absolute, _, pairwise, _ = (body["response_format"] for _, body in server.requests)
    assert absolute == ABSOLUTE_FORMAT and pairwise == PAIRWISE_FORMAT
    schema = absolute["json_schema"]["schema"]
    assert absolute["type"] == "json_schema" and absolute["json_schema"]["strict"] is True
    assert schema["properties"]["result"] == {"type": "integer", "enum": [0, 1]}
    assert schema["properties"]["explain"] == {"type": "string"}
    assert schema["required"] == ["result", "explain"] and schema["additionalProperties"] is False
    assert pairwise["json_schema"]["schema"]["properties"]["result"] == {"type": "string", "enum": ["A", "B", "tie"]}
    assert judge.structured_output and NO_STRUCTURED_OUTPUT not in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [
    ('{"result": 1, "explain": "Right."}', (1, "Right.")),
    ('{"explain": "Wrong\\n  date.", "result": 0}', (0, "Wrong date.")),
    ('\n {"result": 0, "explain": ""} \n', (0, "")),
    ('<think>Result: 0? No.</think>{"result": 1, "explain": "Thought first."}', (1, "Thought first.")),
    ('{"result": 0, "explain": "<result>1</result>"}', (0, "<result>1</result>")),  # the JSON, not its text
])
def test_parse_absolute_reads_the_schema(text, expected):
    assert parse_absolute(text) == expected


@pytest.mark.parametrize("text", [
    '{"result": true, "explain": "x"}', '{"result": 1.0, "explain": "x"}', '{"result": "1", "explain": "x"}',
    '{"result": 2, "explain": "x"}', '{"result": 1}', '{"result": 1, "explain": 3}', '[1, "x"]',
    '{"result": 1, "explain": "x", "confidence": 0.9}', '{"result": 1, "explain": "x"',
    '{"result": null, "explain": ""}', "[" * 100_000,
])
def test_json_that_breaks_the_schema_is_unparseable_not_guessed(text):
    assert parse_absolute(text)[0] is None


@pytest.mark.parametrize("text, expected", [
    ('{"result": "A", "explain": "Shorter."}', "A"), ('{"result": "tie", "explain": ""}', "tie"),
    ('{"result": "a", "explain": ""}', None), ('{"result": "Answer B", "explain": ""}', None),
    ('{"result": "B"}', None), ('{"result": 1, "explain": ""}', None),
])
def test_parse_pairwise_reads_the_schema(text, expected):
    assert parse_pairwise(text) == expected


# ---------------------------------------------------------------------------------------- a server that ignores it


def test_a_server_ignoring_response_format_is_read_in_the_text_form(server, tmp_path, capsys):
    server.behaviour = grade  # structured_output="ignore": the text form, whatever was asked
    judge = Judge(settings(server, tmp_path))
    verdicts = judge.absolute([("q1", "Rome", "Rome"), ("q2", "Rome", "Milan")])
    assert [(v.score, v.reason) for v in verdicts] == [(1, "Same facts."), (0, "Other facts.")]
    assert verdicts[0].raw == "<result>1</result><explain>Same facts.</explain>"
    assert len(with_format(server)) == server.attempts == 2  # nothing asked twice
    assert judge.structured_output and NO_STRUCTURED_OUTPUT not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- a server that refuses it


def test_a_refusal_is_asked_again_without_it_once_and_remembered(server, tmp_path, capsys):
    server.structured_output, server.behaviour = "refuse", grade
    judge = Judge(settings(server, tmp_path, concurrency=1))
    verdicts = judge.absolute([("q1", "Bern", "Bern"), ("q2", "Bern", "Zurich"), ("q3", "Oslo", "Oslo")])
    assert [(v.score, v.error) for v in verdicts] == [(1, None), (0, None), (1, None)]
    server.behaviour = lambda body: Reply("<result>tie</result>")
    [pair] = judge.pairwise([("q4", "ref", "base", "tuned")])
    assert pair == PairVerdict("tie", ("<result>tie</result>", "<result>tie</result>"))

    refused, retried = server.requests[0][1], server.requests[1][1]
    assert len(with_format(server)) == 1 and server.attempts == 1 + 3 + 2  # one refusal in the whole run
    assert retried == {key: value for key, value in refused.items() if key != "response_format"}
    assert not judge.structured_output
    assert capsys.readouterr().err.count(NO_STRUCTURED_OUTPUT) == 1


def test_requests_in_flight_when_the_refusal_comes_are_each_refused_once(server, tmp_path, capsys):
    started = threading.Barrier(4, timeout=5)

    def refuse_together(body: dict) -> Reply:
        if "response_format" not in body:
            return grade(body)
        started.wait()  # four requests in flight before any refusal arrives
        return Reply(status=400, body=b'{"error": {"message": "Unknown field: json_schema"}}')

    server.behaviour = refuse_together
    items = [(f"q{i}", "r", "r") for i in range(12)]
    verdicts = Judge(settings(server, tmp_path, concurrency=4)).absolute(items)
    assert all(v.score == 1 for v in verdicts)
    refused = [question(body) for body in with_format(server)]
    assert len(refused) == 4 and len(set(refused)) == 4 and server.attempts == 4 + 12
    assert capsys.readouterr().err.count(NO_STRUCTURED_OUTPUT) == 1


@pytest.mark.parametrize("status, said", [(422, '{"detail": [{"loc": ["body"], "msg": "extra fields not permitted"}]}'),
                                          (400, '{"error": "json_schema is not supported"}')])
def test_other_refusals_of_structured_output(server, tmp_path, status, said):
    server.behaviour = lambda body: Reply(status=status, body=said.encode()) if "response_format" in body else Reply()
    [verdict] = Judge(settings(server, tmp_path)).absolute([("q", "r", "a")])
    assert verdict.score == 1 and server.attempts == 2


def test_a_400_for_another_reason_is_no_refusal_of_structured_output(server, tmp_path, capsys):
    server.behaviour = lambda body: Reply(status=400, body=b'{"error": {"message": "model judge-test not found"}}')
    judge = Judge(settings(server, tmp_path))
    [verdict] = judge.absolute([("q", "r", "a")])
    assert "HTTP 400" in verdict.error and "not found" in verdict.error and server.attempts == 1
    assert judge.structured_output and NO_STRUCTURED_OUTPUT not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- cache


def test_cache_keys_include_the_response_format(server, tmp_path):
    client = ChatClient(settings(server, tmp_path))
    messages = absolute_messages("q", "r", "a")
    keys = {client.key(messages), client.key(messages, response_format=ABSOLUTE_FORMAT),
            client.key(messages, response_format=PAIRWISE_FORMAT)}
    assert len(keys) == 3 and client.key(messages, response_format=None) == client.key(messages)

    server.structured_output = "honour"
    plain, structured = client.ask(messages), client.ask(messages, response_format=ABSOLUTE_FORMAT)
    assert server.attempts == 2 and plain != structured  # a structured request is another request
    assert (client.ask(messages), client.ask(messages, response_format=ABSOLUTE_FORMAT)) == (plain, structured)
    assert server.attempts == 2 and client.cache_hits == 2


def test_structured_replies_are_cached(server, tmp_path):
    server.structured_output = "honour"
    first = Judge(settings(server, tmp_path)).absolute([("q", "r", "r")])
    again = Judge(settings(server, tmp_path)).absolute([("q", "r", "r")])  # another run: the cache is on disk
    assert again == first and first[0].score == 1 and server.attempts == 1


def test_a_reply_cached_by_an_earlier_run_still_parses(server, tmp_path):
    """An earlier affiner asked without response_format and cached the text form; asking the same way finds it."""
    earlier = ChatClient(settings(server, tmp_path), cache_name="judge")
    earlier.ask(absolute_messages("q", "r", "a"), temperature=0)  # the text form: "<result>1</result>..."
    server.structured_output, server.behaviour = "refuse", lambda body: Reply("<result>0</result>")
    [verdict] = Judge(settings(server, tmp_path)).absolute([("q", "r", "a")])
    assert (verdict.score, verdict.reason) == (1, "Matches the reference.")
    assert server.attempts == 2  # the earlier reply, then the refusal; the retry came from the cache
