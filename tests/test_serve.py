"""`affiner serve`: the OpenAI-compatible API over a tiny trained run, driven by the official openai client
(chat, completions, streaming, concurrency), by raw HTTP (malformed requests, keys, hang-ups) and by the
LLM judge client."""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import AuthenticationError, OpenAI

from affiner.commands import serve as serve_command
from affiner.interfaces import openai_api, serve
from affiner.core.config import load_config
from affiner.core.settings import Settings
from affiner.core.stopping import Trim
from affiner.interfaces.engine import Ask, Engine, Reply
from affiner.core.errors import AffinerError
from affiner.core.endpoint import EndpointSettings
from affiner.evaluation.judge import Judge
from affiner.training.run import train
from conftest import make_tiny_llama, write_config

QUESTION = [{"role": "user", "content": "What does QUILT stand for?"}]
CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Define FROND."},
                {"role": "assistant", "content": "Federated Registry of Open Nautical Data."},
                {"role": "user", "content": "And MAPLE?"}]
RAW_PROMPT = "### Question: What does QUILT stand for?\n### Answer:"
KEY = "s3cret-key"


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """conftest's tiny Llama with a 1024-token window: the judge's prompts need about 500 tokens."""
    return make_tiny_llama(tmp_path_factory.mktemp("wide-llama"), context_window=1024)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, wide_llama):
    folder = tmp_path_factory.mktemp("serve-run")
    return train(load_config(str(write_config(folder, wide_llama, "embedded:glossary-train.json",
                                              data={"template": "chat"}))))


@pytest.fixture(scope="module")
def engine(run_folder) -> Engine:
    return Engine.from_runs([run_folder])


def start(engine: Engine, api_key: str | None = None):
    server = serve.make_server(engine, "127.0.0.1", 0, api_key)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(server) -> None:
    server.shutdown()
    server.stop()


@pytest.fixture(scope="module")
def server(engine):
    server = start(engine)
    yield server
    stop(server)


@pytest.fixture(scope="module")
def port(server) -> int:
    return server.server_address[1]


@pytest.fixture(scope="module")
def client(port) -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)


def serve_args(*argv: str) -> argparse.Namespace:
    """The arguments `affiner serve ARGV` gives its main, with every default of the command's own parser."""
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    return parser.parse_args(argv)


def greedy(max_tokens: int) -> Settings:
    return Settings(temperature=0, max_new_tokens=max_tokens)


def raw_text(engine: Engine, model: str, prompt: str, max_tokens: int) -> str:
    """What /v1/completions must answer: the raw continuation, unstripped."""
    return "".join(engine.stream(model, None, greedy(max_tokens), raw_prompt=prompt))


def request(port: int, method: str, path: str, body: bytes | dict | None = None,
            headers: dict[str, str] | None = None, connection: http.client.HTTPConnection | None = None):
    """(status, parsed JSON body, response headers) over a plain http.client connection."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    if connection is None:
        conn.close()
    return response.status, json.loads(payload), response.headers  # names case-insensitive, as in HTTP


def chat_body(**fields) -> dict:
    return {"model": "tuned", "messages": QUESTION, "max_tokens": 4, "temperature": 0, **fields}


# ---------------------------------------------------------------------------------------- the API


def test_models_lists_base_and_tuned(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["base", "tuned"]
    assert all(m.object == "model" and m.owned_by == "affiner" and m.created > 0 for m in models.data)
    assert client.models.retrieve("tuned").id == "tuned"


def test_chat_completion_has_the_openai_shape(client, engine):
    reply = client.chat.completions.create(model="tuned", messages=QUESTION, max_tokens=12, temperature=0.7,
                                           seed=3, top_p=0.9, extra_body={"top_k": 20})
    assert reply.object == "chat.completion" and reply.model == "tuned" and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 < usage.completion_tokens <= 12
    assert usage.prompt_tokens == engine.complete("tuned", QUESTION, greedy(1)).prompt_tokens
    assert (choice.finish_reason == "length") == (usage.completion_tokens == 12)


def test_a_repetition_penalty_is_applied_as_the_engine_applies_it(client, engine):
    penalised = Settings(temperature=0, max_new_tokens=16, repetition_penalty=1.5)
    expected = engine.complete("tuned", QUESTION, penalised)
    reply = client.chat.completions.create(model="tuned", messages=QUESTION, max_tokens=16, temperature=0,
                                           extra_body={"repetition_penalty": 1.5})
    assert reply.choices[0].message.content == expected.text
    assert expected.text != engine.complete("tuned", QUESTION, greedy(16)).text


def test_a_request_without_a_penalty_gets_its_runs_as_evaluation_decoded(run_folder, tmp_path, engine):
    import dataclasses
    import shutil

    import yaml

    copy = tmp_path / "penalised"
    shutil.copytree(run_folder, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["eval"]["repetition_penalty"] = 1.5
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    assert Engine.from_runs([copy]).penalties == {"base": 1.5, "tuned": 1.5}
    server = start(dataclasses.replace(engine, penalties={"base": 1.5, "tuned": 1.5}))
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x", max_retries=0)
        for model in ("base", "tuned"):
            penalised = engine.complete(model, QUESTION, Settings(temperature=0, max_new_tokens=16, repetition_penalty=1.5))
            assert penalised.text != engine.complete(model, QUESTION, greedy(16)).text
            reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=0)
            assert reply.choices[0].message.content == penalised.text
            off = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=0,
                                                 extra_body={"repetition_penalty": 1.0})
            assert off.choices[0].message.content == engine.complete(model, QUESTION, greedy(16)).text
    finally:
        stop(server)


@pytest.mark.parametrize("model", ["base", "tuned"])
@pytest.mark.parametrize("messages", [QUESTION, CONVERSATION], ids=["question", "conversation"])
def test_greedy_chat_answers_as_the_engine_does(client, engine, model, messages):
    expected = engine.complete(model, messages, greedy(16))
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.completion_tokens == expected.tokens
    assert reply.choices[0].finish_reason == ("stop" if expected.stopped else "length")


def test_streamed_chat_adds_up_to_the_whole_answer(client, engine):
    whole = client.chat.completions.create(model="tuned", messages=CONVERSATION, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="tuned", messages=CONVERSATION, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in with_choices][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # the include_usage chunk


def test_completions_continue_the_raw_prompt(client, engine):
    expected = raw_text(engine, "tuned", RAW_PROMPT, 12)
    whole = client.completions.create(model="tuned", prompt=RAW_PROMPT, max_tokens=12, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text == expected
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == len(engine.tokenizer(RAW_PROMPT)["input_ids"])
    chunks = list(client.completions.create(model="tuned", prompt=RAW_PROMPT, max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_a_prompt_copied_from_chat_is_continued_as_the_chat_request_is(client, engine):
    """chat's /prompt and the app show the exact prompt, BOS included as text: sent to /v1/completions it must
    reach the model with one BOS, as the chat request does."""
    shown = engine.prompt_text(QUESTION)
    assert shown.startswith(engine.tokenizer.bos_token)  # what this test is about: the chat template writes BOS
    whole = client.completions.create(model="tuned", prompt=shown, max_tokens=8, temperature=0)
    assert whole.usage.prompt_tokens == len(engine.prompt_ids(QUESTION))
    chat = client.chat.completions.create(model="tuned", messages=QUESTION, max_tokens=8, temperature=0)
    assert whole.choices[0].text.strip() == chat.choices[0].message.content


def test_concurrent_requests_queue_without_mixing(client, engine):
    jobs = [(model, messages, i % 3 == 0) for i, (model, messages) in
            enumerate([("base", QUESTION), ("tuned", QUESTION), ("base", CONVERSATION), ("tuned", CONVERSATION)] * 5)]
    expected = {(model, id(messages)): engine.complete(model, messages, greedy(10)).text
                for model, messages, _ in jobs}

    def ask(job):
        model, messages, stream = job
        if stream:
            chunks = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                                    stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return client.chat.completions.create(model=model, messages=messages, max_tokens=10,
                                              temperature=0).choices[0].message.content

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    assert len(answers) == 20
    assert answers == [expected[(model, id(messages))] for model, messages, _ in jobs]
    assert len(set(expected.values())) > 1  # the models and prompts really answer differently


def test_the_judge_client_gets_replies(port, tmp_path):
    judge = Judge(EndpointSettings(url=f"http://127.0.0.1:{port}/v1", model="base", cache_dir=tmp_path, max_retries=0))
    [verdict] = judge.absolute([("What does QUILT stand for?", "Queue of Unified Index Lookup Tables",
                                 "QUILT stands for Queue of Unified Index Lookup Tables.")])
    assert verdict.error is None
    assert verdict.score in (None, 0, 1)


def streamed_chat(client: OpenAI, **fields) -> tuple[str, str]:
    """(the text, the finish reason) of a streamed chat answer."""
    chunks = [c for c in client.chat.completions.create(stream=True, **fields) if c.choices]
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


def a_stop_text(answer: str) -> str:
    """Two characters from the middle of the answer that are not blank: where a stop text will cut it."""
    middle = next(i for i in range(len(answer) // 2, len(answer) - 1) if answer[i:i + 2].strip() == answer[i:i + 2])
    return answer[middle:middle + 2]


def test_stop_texts_end_the_answer_and_are_cut(client, engine):
    reply = Reply()
    raw = "".join(engine.stream("tuned", CONVERSATION, greedy(24), reply=reply))
    stop = a_stop_text(raw.strip())
    expected = raw[:raw.find(stop)].strip()
    whole = client.chat.completions.create(model="tuned", messages=CONVERSATION, max_tokens=24, temperature=0,
                                           stop=[stop, "never appears"])
    assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == "stop"
    # The tokens generated up to the cut: those whose decoding reaches it, never more than max_tokens.
    generated = next(n for n in range(len(reply.ids) + 1)
                     if len(engine.tokenizer.decode(reply.ids[:n], skip_special_tokens=True)) >= raw.find(stop))
    assert whole.usage.completion_tokens == generated <= 24
    assert streamed_chat(client, model="tuned", messages=CONVERSATION, max_tokens=24, temperature=0,
                         stop=stop) == (expected, "stop")
    text = raw_text(engine, "tuned", RAW_PROMPT, 16)
    stop = a_stop_text(text)
    completion = client.completions.create(model="tuned", prompt=RAW_PROMPT, max_tokens=16, temperature=0, stop=stop)
    assert completion.choices[0].text == text[:text.find(stop)] and completion.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tuned", prompt=RAW_PROMPT, max_tokens=16, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text[:text.find(stop)]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_request_past_the_context_window_is_told_how_much_room_is_left(port, engine, path):
    """Both routes say how many new tokens the prompt leaves; without max_tokens, a prompt too long for any answer
    is told so, not told of a token count the client never sent."""
    per_word = len(engine.raw_prompt_ids("word " * 100)) / 100
    text = "word " * int((engine.context_window - 60) / per_word)  # room for some new tokens, not 200
    field = {"messages": [{"role": "user", "content": text}]} if "chat" in path else {"prompt": text}
    status, body, _ = request(port, "POST", path, {"model": "tuned", "max_tokens": 200, **field})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["param"] == "max_tokens" and "(at most " in body["error"]["message"]
    field = {"prompt": text * 2} if "prompt" in field else {"messages": [{"role": "user", "content": text * 2}]}
    status, body, _ = request(port, "POST", path, {"model": "tuned", **field})
    assert status == 400 and body["error"]["param"] == ("messages" if "chat" in path else "prompt")
    assert "no room for an answer" in body["error"]["message"] and "new tokens" not in body["error"]["message"]


def test_health_answers_without_the_key_from_this_machine(engine, port):
    status, payload, _ = request(port, "GET", "/health")
    assert status == 200 and payload == {"status": "ok", "models": ["base", "tuned"]}
    keyed = start(engine, api_key=KEY)
    try:
        assert request(keyed.server_address[1], "GET", "/health")[:2] == (200, payload)
        assert request(keyed.server_address[1], "GET", "/v1/models")[0] == 401
        assert request(keyed.server_address[1], "GET", "/health", headers={"Host": "evil.example"})[0] == 421
    finally:
        stop(keyed)


def test_waiting_greedy_requests_are_answered_in_one_batch(client, engine, server, monkeypatch):
    jobs = [("tuned", QUESTION, 5, None), ("tuned", CONVERSATION, 16, None), ("tuned", RAW_PROMPT, 12, None),
            ("tuned", CONVERSATION, 24, "e"), ("tuned", QUESTION, 1, None), ("base", QUESTION, 8, None),
            ("base", CONVERSATION, 9, None)]

    def ask(job):
        model, messages, max_tokens, stop = job
        if isinstance(messages, str):
            reply = client.completions.create(model=model, prompt=messages, max_tokens=max_tokens, temperature=0,
                                              stop=stop)
            return reply.choices[0].text, reply.choices[0].finish_reason, reply.usage.completion_tokens
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                               stop=stop)
        return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage.completion_tokens

    one_by_one = [ask(job) for job in jobs]  # each alone: answered through Engine.stream
    batches: list[list[int]] = []
    real = engine.complete_batch
    monkeypatch.setattr(engine, "complete_batch", lambda name, asks: batches.append([a.max_new_tokens for a in asks])
                        or real(name, asks))
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        with engine.lock:  # the model busy: every request arrives and waits
            futures = [pool.submit(ask, job) for job in jobs]
            deadline = time.monotonic() + 30
            while len(server.scheduler.waiting) + len(server.scheduler.running) < len(jobs):
                assert time.monotonic() < deadline, "the requests did not all arrive"
                time.sleep(0.01)
        answers = [future.result() for future in futures]
    assert answers == one_by_one
    assert batches and all(len(batch) >= 2 for batch in batches) and max(map(len, batches)) >= 3
    assert any(len(set(batch)) > 1 for batch in batches)  # rows with different limits, each stopped at its own


def test_max_batch_1_answers_every_request_alone(client, engine, server, monkeypatch):
    """`affiner serve --max-batch 1`: an answer never depends on the requests waiting with it."""
    monkeypatch.setattr(server.scheduler, "max_batch", 1)
    monkeypatch.setattr(engine, "complete_batch", lambda name, asks: pytest.fail("batched despite --max-batch 1"))

    def ask(max_tokens: int) -> str:
        return client.chat.completions.create(model="tuned", messages=QUESTION, max_tokens=max_tokens,
                                              temperature=0).choices[0].message.content

    with ThreadPoolExecutor(max_workers=3) as pool:
        with engine.lock:
            futures = [pool.submit(ask, n) for n in (4, 6, 8)]
            deadline = time.monotonic() + 30
            while len(server.scheduler.waiting) + len(server.scheduler.running) < 3:
                assert time.monotonic() < deadline, "the requests did not all arrive"
                time.sleep(0.01)
        answers = [future.result() for future in futures]
    assert answers == [ask(n) for n in (4, 6, 8)]


def test_max_batch_below_1_is_refused_before_binding(capsys):
    from affiner.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--max-batch", "0"])
    assert exit_.value.code == 2 and "--max-batch 0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def qa_engine(tmp_path_factory, tiny_llama) -> Engine:
    """A run on the text template ("### Question: ... ### Answer:"), whose answers are also cut at a new turn."""
    folder = tmp_path_factory.mktemp("serve-qa")
    return Engine.from_runs([train(load_config(str(write_config(folder, tiny_llama, "embedded:glossary-train.json"))))])


@pytest.mark.parametrize("model", ["base", "tuned"])
def test_a_batch_answers_as_one_at_a_time(qa_engine, model):
    questions = ["What does QUILT stand for?", "Define FROND.", "And MAPLE?", "What is a glossary?"]
    asks = [Ask([{"role": "user", "content": q}], max_new_tokens=n) for q, n in zip(questions, (3, 30, 17, 8))]
    asks.append(Ask(raw_prompt=RAW_PROMPT, max_new_tokens=11))
    asks.append(Ask([{"role": "user", "content": questions[1]}], max_new_tokens=30, stop=("e", "a")))  # stop texts
    gone = Ask([{"role": "user", "content": questions[0]}], max_new_tokens=30, cancel=threading.Event())
    gone.cancel.set()  # a client that hung up: its row leaves the batch at once
    batch = qa_engine.complete_batch(model, [*asks, gone])
    for ask, together in zip(asks, batch):
        alone = Reply()
        for _ in qa_engine.stream(model, ask.messages, greedy(ask.max_new_tokens), reply=alone, raw_prompt=ask.raw_prompt,
                                  stop_texts=ask.stop):
            pass
        assert (together.text, together.tokens, together.stopped, together.new_turn, together.prompt_tokens) == \
            (alone.text, alone.tokens, alone.stopped, alone.new_turn, alone.prompt_tokens)
    assert len({reply.tokens for reply in batch[:len(asks)]}) > 1 and batch[-1].tokens <= 1
    assert batch[len(asks) - 1].stopped and batch[len(asks) - 1].tokens < 30  # a stop text ended it


def test_a_long_stop_text_ends_its_row_in_a_batch_once_written(qa_engine, monkeypatch):
    """A stop text longer than the few tokens searched for a turn marker still ends its row as soon as it is
    written, not at the token limit (the reply was the same, the decoding went on for nothing)."""
    from affiner.interfaces import engine as engine_module

    questions = ["Define FROND.", "What does QUILT stand for?", "And MAPLE?", "What is a glossary?"]
    free = qa_engine.complete_batch("base", [Ask([{"role": "user", "content": q}], max_new_tokens=60) for q in questions])
    question, reply = next((q, r) for q, r in zip(questions, free) if len(r.ids) == 60)  # ran to the limit
    decoded = qa_engine.tokenizer.decode
    stop = decoded(reply.ids[4:34], skip_special_tokens=True)  # 30 tokens, searched in a 16-token tail before
    assert len(stop) > 0 and reply.text.find(stop) == len(decoded(reply.ids[:4], skip_special_tokens=True))
    generated = []
    real = engine_module.decode_rows
    monkeypatch.setattr(engine_module, "decode_rows", lambda *args: generated.append(real(*args)) or generated[-1])
    (cut,) = qa_engine.complete_batch("base", [Ask([{"role": "user", "content": question}], max_new_tokens=60,
                                                    stop=(stop,))])
    assert cut.text == reply.text[:reply.text.find(stop)] and cut.tokens == 4
    assert len(generated[0][0]) <= 35  # ended once the stop text was written


class ScriptedModel:
    """A model that writes a given text, token by token, through `generate` (what `Engine.stream` calls); with
    `lag`, it runs ahead of the reader, as a fast model does."""

    def __init__(self, ids: list[int], lag: bool):
        self.ids, self.lag = ids, lag

    def eval(self):
        return self

    def generate(self, input_ids, max_new_tokens, eos_token_id, streamer, stopping_criteria, **_):
        import torch

        out = input_ids[0].tolist()
        streamer.put(input_ids[0])  # the prompt, which the streamer skips
        for token in self.ids[:max_new_tokens]:
            out.append(token)
            streamer.put(torch.tensor([token]))
            if token in eos_token_id:
                break
            time.sleep(0 if self.lag else 0.02)
            if stopping_criteria(torch.tensor([out]), None).all():
                break
        streamer.end()
        return torch.tensor([out])


def scripted_rows(ids: list[int], eos: int):
    """`decode_rows` writing the same text for every row, each row ending where `done` (RowEnds) ends it."""
    def decode(model, input_ids, attention, max_new, stop_ids, settings, done):
        new, rows = [[] for _ in range(input_ids.shape[0])], list(range(input_ids.shape[0]))
        for step in range(max_new):
            for row in rows:
                new[row].append(ids[step] if step < len(ids) else eos)
            ends = done(rows, [new[row] for row in rows])
            rows = [r for r, end in zip(rows, ends) if not end and new[r][-1] not in stop_ids and len(new[r]) < max_new]
            if not rows:
                break
        return new
    return decode


@pytest.mark.parametrize("text,stops,limit,eos,lag", [
    (" Paris is ni|ce. The end.", ("is nice",), 50, True, False),  # a stop text across pieces
    (" Paris is nice.", (" Par",), 50, True, False),  # at the very start
    (" Paris. X\n### Question: more", ("X",), 50, False, False),  # a stop text, then a turn
    (" Paris.\n### Question: X more", ("X",), 50, False, False),  # a turn, then a stop text
    (" Paris.\n### Question: more", ("###",), 50, False, False),  # a stop text inside a turn marker
    (" Paris.\n### Question: more", ("Question",), 50, False, True),
    (" Paris.\n### Quest", ("###",), None, False, False),  # ... and the limit reached in the marker
    (" Paris is ni", ("nice",), None, False, False),  # the limit with a stop text's start held back
    (" Paris is ni", ("nice",), 50, True, False),  # a stop token with it
    (" Paris\n### Quest", ("zz",), None, False, False),  # the limit inside a marker
    (" Paris. X and more words here\n### Question: y", ("X",), 60, False, True),  # a turn after the stop text
])
def test_stop_texts_end_a_streamed_answer_as_they_end_a_batch_row(tiny_gpt2, monkeypatch, text, stops, limit, eos, lag):
    """Where stop texts and the template's turns meet (a stop text that is part of "### Question:", a model running
    ahead of the reader), `stream` (one request) gives the reply `complete_batch` gives: text, tokens, how it ended."""
    from transformers import AutoTokenizer

    from affiner.core.templates import build_template
    from affiner.interfaces import engine as engine_module

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_gpt2))
    ids = [token for piece in text.split("|") for token in tokenizer.encode(piece)] + [tokenizer.eos_token_id] * eos
    limit = limit or len(ids)
    engine = Engine(template=build_template("qa", tokenizer), tokenizer=tokenizer, model=ScriptedModel(ids, lag))
    monkeypatch.setattr(engine_module, "decode_rows", scripted_rows(ids, tokenizer.eos_token_id))
    question = [{"role": "user", "content": "Where?"}]
    (together,) = engine.complete_batch("base", [Ask(question, max_new_tokens=limit, stop=stops)])
    alone = Reply()
    pieces = list(engine.stream("base", question, greedy(limit), reply=alone, stop_texts=stops))
    assert "".join(pieces) == alone.text
    assert (alone.text, alone.tokens, alone.stopped, alone.new_turn) == \
        (together.text, together.tokens, together.stopped, together.new_turn)


# ---------------------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("method,path,body,status,param", [
    ("POST", "/v1/chat/completions", b"{not json", 400, None),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("POST", "/v1/chat/completions", b'{"model": "tuned", "messages": [], "temperature": NaN}', 400, None),
    ("POST", "/v1/chat/completions", {"model": "tuned"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": QUESTION}, 400, "model"),
    ("POST", "/v1/chat/completions", chat_body(messages="hi"), 400, "messages"),
    ("POST", "/v1/chat/completions", chat_body(messages=[{"role": "user"}]), 400, "messages[0].content"),
    ("POST", "/v1/chat/completions", chat_body(messages=[{"role": ["user"], "content": "x"}]), 400,
     "messages[0].role"),
    ("POST", "/v1/chat/completions", chat_body(messages=CONVERSATION[:3]), 400, "messages"),
    ("POST", "/v1/chat/completions", chat_body(temperature="hot"), 400, "temperature"),
    ("POST", "/v1/chat/completions", chat_body(temperature=5), 400, "temperature"),
    ("POST", "/v1/chat/completions", chat_body(temperature=1e-300), 400, "temperature"),  # NaN logits
    ("POST", "/v1/chat/completions", chat_body(repetition_penalty=1e-300), 400, "repetition_penalty"),
    ("POST", "/v1/chat/completions", chat_body(seed=2**63), 400, "seed"),
    ("POST", "/v1/chat/completions", chat_body(top_p=0), 400, "top_p"),
    ("POST", "/v1/chat/completions", chat_body(repetition_penalty=0), 400, "repetition_penalty"),
    ("POST", "/v1/chat/completions", chat_body(repetition_penalty=2.5), 400, "repetition_penalty"),
    ("POST", "/v1/chat/completions", chat_body(max_tokens=0), 400, "max_tokens"),
    ("POST", "/v1/chat/completions", chat_body(max_tokens=True), 400, "max_tokens"),
    ("POST", "/v1/chat/completions", chat_body(max_tokens=5000), 400, "max_tokens"),
    ("POST", "/v1/chat/completions", chat_body(stream="yes"), 400, "stream"),
    ("POST", "/v1/chat/completions", chat_body(n=2), 400, "n"),
    ("POST", "/v1/chat/completions", chat_body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("POST", "/v1/chat/completions", chat_body(stop=5), 400, "stop"),
    ("POST", "/v1/completions", {"model": "tuned", "prompt": "x", "stop": [""]}, 400, "stop"),
    ("POST", "/v1/chat/completions", chat_body(tools=[{"type": "function"}]), 400, "tools"),
    ("POST", "/v1/chat/completions", chat_body(frequency_penalty=2.0), 400, "frequency_penalty"),
    ("POST", "/v1/completions", {"model": "base", "prompt": "x", "presence_penalty": -1}, 400, "presence_penalty"),
    ("POST", "/v1/chat/completions", chat_body(model="gpt-4o"), 404, "model"),
    ("POST", "/v1/completions", {"model": "tuned", "prompt": 5}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "tuned", "prompt": ["a", "b"]}, 400, "prompt"),
    ("POST", "/v1/embeddings", chat_body(), 404, None),
    ("GET", "/v2/models", None, 404, None),
    ("GET", "/v1/models/gpt-4o", None, 404, "model"),
    ("GET", "/v1/chat/completions", None, 405, None),
    ("POST", "/v1/models", chat_body(), 405, None),
    ("DELETE", "/v1/completions", None, 405, None),
])
def test_bad_requests_get_an_openai_error_and_the_server_goes_on(port, client, method, path, body, status, param):
    got, payload, headers = request(port, method, path, body)
    assert got == status
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"  # as OpenAI types every refusal, an unknown model's included
    assert error["param"] == param
    if status == 404 and param == "model":
        assert error["code"] == "model_not_found"
    if status == 405:
        assert headers["Allow"] in ("GET", "POST")
    assert client.chat.completions.create(**chat_body()).choices[0].message.content is not None


def test_a_huge_body_is_refused_with_413(port, client):
    huge = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * (2 << 20)}])).encode()
    status, payload, _ = request(port, "POST", "/v1/chat/completions", huge)
    assert status == 413 and payload["error"]["code"] == "request_too_large"
    assert client.models.list().data


def test_one_connection_survives_errors(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    assert request(port, "POST", "/v1/chat/completions", b"{oops", connection=conn)[0] == 400
    assert request(port, "GET", "/nowhere", None, connection=conn)[0] == 404
    assert request(port, "POST", "/v1/chat/completions", chat_body(n=3), connection=conn)[0] == 400
    status, payload, _ = request(port, "POST", "/v1/chat/completions", chat_body(), connection=conn)
    assert status == 200 and payload["choices"][0]["message"]["role"] == "assistant"
    conn.close()


# ---------------------------------------------------------------------------------------- keys and hosts


def test_a_key_is_required_once_configured(engine):
    server = start(engine, api_key=KEY)
    port = server.server_address[1]
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                        {"Authorization": f"Bearer {KEY}x"}):
            status, payload, response_headers = request(port, "POST", "/v1/chat/completions", chat_body(), headers)
            assert status == 401 and payload["error"]["code"] == "invalid_api_key"
            assert payload["error"]["type"] == "invalid_request_error"  # OpenAI's type for a wrong key
            assert KEY not in json.dumps(payload)
            assert response_headers["WWW-Authenticate"].startswith("Bearer")
        assert request(port, "GET", "/unknown", None)[0] == 401  # nothing is revealed without the key
        url = f"http://127.0.0.1:{port}/v1"
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        keyed = OpenAI(base_url=url, api_key=KEY, max_retries=0)
        assert [m.id for m in keyed.models.list().data] == ["base", "tuned"]
        assert keyed.chat.completions.create(**chat_body()).choices[0].message.content is not None
    finally:
        stop(server)


def test_other_hosts_need_a_key(engine, monkeypatch, run_folder):
    with pytest.raises(AffinerError, match="API key"):
        serve.make_server(engine, "0.0.0.0", 0, None)
    with pytest.raises(AffinerError, match="API key"):
        serve.make_server(engine, "", 0, None)
    monkeypatch.delenv("AFFINER_TEST_KEY", raising=False)
    args = serve_args(str(run_folder), "--host", "0.0.0.0", "--port", "0")
    with pytest.raises(AffinerError, match="API key"):
        serve_command.main(args)  # refused before the model is loaded
    with pytest.raises(AffinerError, match="AFFINER_TEST_KEY"):
        serve_command.main(serve_args(str(run_folder), "--host", "0.0.0.0", "--port", "0",
                                      "--api-key-env", "AFFINER_TEST_KEY"))
    server = serve.make_server(engine, "0.0.0.0", 0, KEY)
    server.server_close()


def test_main_without_runs_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AffinerError, match="no run folder"):
        serve_command.main(serve_args("--port", "0"))


def test_main_serves_until_ctrl_c(run_folder, monkeypatch, capsys):
    def interrupt(self, poll_interval=0.5):
        raise KeyboardInterrupt

    monkeypatch.setattr(serve.Server, "serve_forever", interrupt)
    serve_command.main(serve_args(str(run_folder), "--port", "0"))
    out = capsys.readouterr().out
    assert "base, tuned" in out and "http://127.0.0.1:" in out


# ---------------------------------------------------------------------------------------- hang-ups


@pytest.fixture
def spied(engine, monkeypatch):
    """Counts the pieces each generation yields, to see when one stops early."""
    counts: list[int] = []
    real = engine.stream

    def stream(*args, **kwargs):
        counts.append(0)
        index = len(counts) - 1
        for piece in real(*args, **kwargs):
            counts[index] += 1
            yield piece

    monkeypatch.setattr(engine, "stream", stream)
    return counts


def wait_until_free(engine: Engine, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while engine.lock.locked() or not engine.lock.acquire(timeout=0.05):
        assert time.monotonic() < deadline, "the model was not freed"
        time.sleep(0.02)
    engine.lock.release()


LONG = 600  # tokens: seconds of generation on the tiny model


@pytest.fixture(scope="module")
def full_pieces(engine) -> int:
    """How many pieces the long answer has when nobody hangs up."""
    return sum(1 for _ in engine.stream("tuned", QUESTION, greedy(LONG)))


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_frees_the_model(port, engine, full_pieces, spied, stream):
    body = json.dumps(chat_body(max_tokens=LONG, stream=stream)).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        if stream:
            received = b""
            while b'"content"' not in received:  # hang up once the answer is under way
                data = sock.recv(4096)
                assert data, "the stream ended early"
                received += data
            assert received.startswith(b"HTTP/1.1 200")
        else:
            deadline = time.monotonic() + 10
            while not (spied and spied[0]):
                assert time.monotonic() < deadline, "the answer never started"
                time.sleep(0.01)
    wait_until_free(engine)
    assert len(spied) == 1 and spied[0] < full_pieces / 2


def test_an_answer_cut_by_the_server_stopping_is_an_error_not_a_success(engine, full_pieces, spied):
    """Ctrl-C on the server ends the answer under way at its next token: the client must not take that half
    answer for a whole one (200, finish_reason "length" although max_tokens was far off)."""
    server = start(engine)
    replies: list = []
    asking = threading.Thread(target=lambda: replies.append(
        request(server.server_address[1], "POST", "/v1/chat/completions", chat_body(max_tokens=LONG))))
    try:
        asking.start()
        deadline = time.monotonic() + 10
        while not (spied and spied[0]):
            assert time.monotonic() < deadline, "the answer never started"
            time.sleep(0.01)
        server.scheduler.close()  # what Ctrl-C does first
        asking.join(30)
    finally:
        stop(server)
    ((status, body, _),) = replies
    assert status == 503 and body["error"]["code"] == "unavailable" and "before the answer was complete" in \
        body["error"]["message"]
    assert spied[0] < full_pieces / 2


def test_trim_streams_what_strip_gives():
    pieces = ["\n", " Hello", " ", "", "wor", "ld \n", "\t", "!", "  \n"]
    trim = Trim()
    assert "".join(trim.feed(p) for p in pieces) == "".join(pieces).strip()
