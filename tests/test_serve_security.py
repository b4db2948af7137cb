"""`affiner serve` against a browser: a page that points its own DNS name at this machine (DNS rebinding)
or posts a form or text/plain body across sites is refused, while ordinary loopback clients still work."""

from __future__ import annotations

import http.client
import json
import threading

import pytest

from affiner.core.config import load_config
from affiner.interfaces import serve
from affiner.interfaces.engine import Engine
from affiner.training.run import train
from conftest import run_cli, write_config

CHAT = {"model": "tuned", "messages": [{"role": "user", "content": "What does QUILT stand for?"}],
        "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_llama) -> Engine:
    folder = tmp_path_factory.mktemp("serve-security")
    return Engine.from_runs([train(load_config(str(write_config(folder, tiny_llama, "embedded:glossary-train.json"))))])


@pytest.fixture(scope="module")
def port(engine):
    server = serve.make_server(engine, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.stop()


@pytest.fixture
def generations(engine, monkeypatch) -> list[str]:
    """The models asked to generate, to see that a refused request never reached one."""
    asked: list[str] = []
    real = engine.stream

    def stream(model, *args, **kwargs):
        asked.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(engine, "stream", stream)
    return asked


def send(port: int, method: str, path: str, headers: dict[str, str], body: bytes | None = None,
         hosts: list[str] | None = None):
    """(status, JSON body) of one request; `hosts` sends these Host headers instead of http.client's own."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest(method, path, skip_host=hosts is not None, skip_accept_encoding=True)
    for host in hosts or []:
        conn.putheader("Host", host)
    for name, value in {**headers, "Content-Length": str(len(body or b""))}.items():
        conn.putheader(name, value)
    conn.endheaders(body)
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return response.status, payload


def assert_openai_error(payload: dict, code: str) -> None:
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and error["message"]


JSON = {"Content-Type": "application/json"}
BODY = json.dumps(CHAT).encode()


@pytest.mark.parametrize("hosts", [["evil.example"], ["evil.example:8000"], ["127.0.0.1.evil.example"],
                                   ["localhost.evil.example:80"], ["evil.example@127.0.0.1"], ["[::2]:80"],
                                   ["localhost evil.example"], [""], ["localhost", "evil.example"]])
def test_a_foreign_host_header_is_refused(port, generations, hosts):
    status, payload = send(port, "POST", "/v1/chat/completions", JSON, BODY, hosts=hosts)
    assert status == 421
    assert_openai_error(payload, "invalid_host")
    status, payload = send(port, "GET", "/v1/models", {}, hosts=hosts)
    assert status == 421 and "data" not in payload
    assert generations == []


@pytest.mark.parametrize("host", ["localhost", "localhost:{port}", "127.0.0.1", "127.0.0.1:{port}", "[::1]",
                                  "[::1]:{port}", "LocalHost.:{port}"])
def test_loopback_host_names_are_answered(port, generations, host):
    status, payload = send(port, "POST", "/v1/chat/completions", JSON, BODY, hosts=[host.format(port=port)])
    assert status == 200 and payload["choices"][0]["message"]["role"] == "assistant"
    assert generations == ["tuned"]


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonp", None])
def test_a_body_not_declared_as_json_is_refused(port, generations, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path in ("/v1/chat/completions", "/v1/completions"):
        status, payload = send(port, "POST", path, headers, BODY)
        assert status == 415
        assert_openai_error(payload, "unsupported_media_type")
    assert generations == []


def test_a_json_body_with_a_charset_is_answered(port, generations):
    status, payload = send(port, "POST", "/v1/chat/completions", {"Content-Type": "Application/JSON; charset=utf-8"},
                           BODY)
    assert status == 200 and payload["choices"][0]["message"]["content"] is not None


@pytest.mark.parametrize("name,bound,allowed", [
    ("gpu-box.lan", "gpu-box.lan", True), ("gpu-box.lan", "GPU-Box.lan.", True), ("10.0.0.5", "10.0.0.5", True),
    ("::1", "10.0.0.5", True), ("localhost", "gpu-box.lan", True), ("127.0.0.2", "gpu-box.lan", True),
    ("evil.example", "gpu-box.lan", False), ("10.0.0.6", "10.0.0.5", False), ("gpu-box.lan", "127.0.0.1", False),
    ("fe80::1", "fe80::0:1", True), ("evil.example", "127.0.0.1", False), ("evil.example", "localhost", False),
    ("evil.example", "0.0.0.0", True),  # every interface: the key, then required, guards the server
])
def test_host_names_accepted_besides_loopback_are_the_host_served_on(name, bound, allowed):
    assert serve.host_allowed(name, bound) is allowed


def test_host_header_names_are_read_without_port_or_brackets():
    assert serve.host_name("[::1]:8000") == "::1" and serve.host_name("LocalHost.:80") == "localhost"
    assert serve.host_name("127.0.0.1") == "127.0.0.1"
    for malformed in ("", "a b", "user@localhost", "::1", "localhost:80:80", "localhost:http", "[localhost]"):
        assert serve.host_name(malformed) is None, malformed


@pytest.mark.parametrize("verb,value", [("serve", "65536"), ("serve", "-1"), ("app", "70000"), ("app", "port")])
def test_port_flags_are_checked_before_anything_runs(verb, value, capsys):
    assert run_cli(verb, "--port", value) == 2
    assert "argument --port" in capsys.readouterr().err
