"""The engine behind chat, app and serve: same prompts as training, adapters on one base, stoppable streams."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from affiner.evaluation import generation as ev
from affiner.core.config import load_config
from affiner.core.settings import Settings
from affiner.interfaces.engine import Engine, Reply
from affiner.core.errors import AffinerError
from affiner.core.models import load_model
from affiner.core.templates import Example, load_template
from affiner.experiments.workflow import train
from conftest import write_config

GREEDY = Settings(temperature=0, max_new_tokens=8)
QUESTION = [{"role": "user", "content": "What does QUILT stand for?"}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("engine")
    return [train(load_config(str(write_config(root / name, tiny_llama, "embedded:glossary-train.json",
                                               data={"template": "chat"},
                                               train={"max_steps": 3, "learning_rate": lr, "seed": seed}))))
            for name, lr, seed in [("a", 5e-2, 1), ("b", 5e-2, 2)]]


@pytest.fixture(scope="module")
def engine(runs):
    return Engine.from_runs(runs, names=["a", "b"])


def test_streamed_answers_are_evaluates_greedy_answers(engine, runs, tiny_llama):
    tokenizer = engine.tokenizer
    template = load_template(runs[0])
    example = Example(instruction=QUESTION[0]["content"])
    base = ev.generate(load_model(str(tiny_llama)), tokenizer, template, [example], 8)[0]
    tuned = ev.generate(load_model(str(tiny_llama), adapter=runs[0]), tokenizer, template, [example], 8)[0]
    for name, expected in (("base", base), ("a", tuned)):
        reply = Reply()
        pieces = list(engine.stream(name, QUESTION, GREEDY, reply=reply))
        assert "".join(pieces).strip() == reply.text.strip() == expected.text
        assert (reply.tokens, reply.stopped) == (expected.tokens, expected.stopped)
        assert reply.first_token_seconds is not None and reply.prompt_tokens > 0


@pytest.mark.parametrize("model_penalty", [1.3, 0.8])
def test_a_base_s_own_repetition_penalty_is_not_added_to_the_run_s(tiny_llama, model_penalty):
    """A base whose generation_config.json sets a repetition penalty (Qwen2.5-Instruct's does): chat and serve answer
    with the run's penalty alone, over the answer's tokens, as its evaluation decoded."""
    from dataclasses import replace

    from affiner.core.models import load_tokenizer
    from affiner.core.templates import build_template

    tokenizer, model = load_tokenizer(str(tiny_llama)), load_model(str(tiny_llama))
    model.generation_config.repetition_penalty = model_penalty
    template = build_template("chat", tokenizer)
    engine = Engine.on_base(model, tokenizer, template, {})
    for penalty in (1.0, 1.2):
        settings = replace(GREEDY, repetition_penalty=penalty, max_new_tokens=30)
        for question in ("What does QUILT stand for?", "tell me about queues", "a b c d e f"):
            expected = ev.generate(model, tokenizer, template, [Example(instruction=question)], 30, sampling=settings)
            assert engine.complete("base", [{"role": "user", "content": question}], settings).text == expected[0].text


def test_adapters_switch_on_one_base(engine):
    answers = {name: engine.complete(name, QUESTION, GREEDY).text for name in engine.names}
    assert engine.names == ["base", "a", "b"]
    assert answers["a"] != answers["b"] or answers["a"] != answers["base"]
    assert engine.complete("a", QUESTION, GREEDY).text == answers["a"]  # switching back gives the same answer
    with pytest.raises(AffinerError, match="unknown model 'c'"):
        engine.complete("c", QUESTION, GREEDY)


def test_a_stop_request_ends_generation_early(engine):
    stop, reply = threading.Event(), Reply()
    settings = Settings(temperature=0, max_new_tokens=100)
    # Asked before the first token: a random model's text may hold no word boundary, so the streamer might
    # deliver nothing to react to before the end.
    stop.set()
    list(engine.stream("base", QUESTION, settings, stop=stop, reply=reply))
    assert reply.tokens < 100 and not reply.stopped


def test_oldest_turns_are_dropped_to_fit_the_context_window(engine):
    long_turn = "word " * 40
    history = []
    for _ in range(6):
        history += [{"role": "user", "content": long_turn}, {"role": "assistant", "content": long_turn}]
    example, dropped = engine.example([*history, *QUESTION], max_new_tokens=16)
    assert dropped > 0 and dropped % 2 == 0
    assert len(example.history) == len(history) - dropped
    with pytest.raises(AffinerError, match="no room for an answer"):
        engine.example([{"role": "user", "content": "word " * 400}], max_new_tokens=16)


def test_a_prompt_too_long_is_told_the_room_left_and_whose_limit_it_is(engine):
    """A prompt that fits but leaves too few tokens is told how many it may have; one that leaves none is told how
    long a prompt may be; a window the server keeps below the model's own is named as the server's."""
    prompt = engine.raw_prompt_ids("word " * 40)
    room = engine.context_window - len(prompt)
    with pytest.raises(AffinerError, match=rf"with {room + 1} new tokens it does not fit the model's "
                                           rf"{engine.context_window}-token context window \(at most {room} new"):
        engine.check_fits(len(prompt), room + 1)
    engine.check_fits(len(prompt), room)
    engine.check_fits(len(prompt), None)
    with pytest.raises(AffinerError, match=f"no room for an answer.*at most {engine.context_window - 1} tokens"):
        engine.check_fits(engine.context_window, None)
    kept = replace(engine, model_window=32768)
    with pytest.raises(AffinerError, match=f"{engine.context_window}-token context window this server keeps "
                                           r"\(the model's own is 32768"):
        kept.check_fits(len(prompt), room + 1)


def test_a_trimmed_conversation_starts_with_a_user_turn_whatever_its_order(engine):
    """Clients may send two user (or assistant) messages in a row: what is dropped to fit is whole messages up to
    the next user turn, never leaving the model a history that opens with its own answer."""
    long_turn = "word " * 8
    roles = ["user", "user", "assistant"] + ["assistant", "user"] * 4
    history = [{"role": role, "content": long_turn} for role in roles]
    kept = set()
    for limit in range(1, engine.context_window, 8):
        try:
            example, dropped = engine.example([*history, *QUESTION], max_new_tokens=limit)
        except AffinerError:
            break  # not even the question fits with that many new tokens
        assert len(example.history) == len(history) - dropped
        assert not example.history or example.history[0][0] == "user"
        kept.add(len(example.history))
    assert len(kept) > 2 and max(kept) < len(history)  # several trims met, from a few messages to all


def test_concurrent_callers_are_served_one_at_a_time(engine):
    expected = {name: engine.complete(name, QUESTION, GREEDY).text for name in engine.names}
    results: list[tuple[str, str]] = []
    threads = [threading.Thread(target=lambda n=name: results.append((n, engine.complete(n, QUESTION, GREEDY).text)))
               for name in engine.names * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 9 and all(text == expected[name] for name, text in results)


def test_settings_parse_and_validate():
    settings = Settings().updated("temperature", "0.5").updated("top_k", "7")
    assert (settings.temperature, settings.top_k) == (0.5, 7)
    for key, value, message in [("temperature", "hot", "must be a float"), ("top_p", "2", "out of range"),
                                ("beams", "2", "unknown setting"),
                                # values sampling cannot take (NaN logits) or torch cannot seed with
                                ("temperature", "1e-300", "0 \\(greedy\\) or from 0.01 to 2"),
                                ("temperature", "inf", "out of range"), ("repetition_penalty", "1e-300", "from 0.1"),
                                ("seed", str(2**64), "out of range")]:
        with pytest.raises(AffinerError, match=message):
            Settings().updated(key, value)


def test_the_chat_session_survives_lines_that_are_not_text_and_answers_the_next(engine, capsys, monkeypatch):
    """Bytes that are not UTF-8, piped or typed, arrive as lone surrogates: said, and the session goes on."""
    from affiner.interfaces.chat import Session

    lines = iter(["\udcff\udcfe bad", QUESTION[0]["content"], "exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    Session(engine, "a", GREEDY).loop()
    out = capsys.readouterr().out
    assert "not valid UTF-8" in out and out.strip().endswith(engine.complete("a", QUESTION, GREEDY).text)


def test_a_seed_chat_cannot_use_is_refused_by_the_flag(capsys):
    from affiner import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["chat", "--prompt", "hi", "--seed", str(2**64)])
    assert exit_info.value.code == 2 and "--seed" in capsys.readouterr().err


def test_chat_session_switches_between_adapters_of_one_base(engine, capsys):
    """`affiner chat RUN_A RUN_B`: /use switches model, and each answers as that adapter alone would."""
    from affiner.interfaces.chat import Session, answer

    expected = {name: answer(engine, name, QUESTION, GREEDY).text for name in ("base", "a", "b")}
    assert expected["a"] != expected["base"]
    session = Session(engine, "a", GREEDY)
    capsys.readouterr()
    session.command("/models")
    assert "base, [a], b" in capsys.readouterr().out
    for name in ("b", "base", "a"):
        session.command(f"/use {name}")
        assert f"now talking to {name}" in capsys.readouterr().out
        session.messages = []
        session.ask(QUESTION[0]["content"])
        assert capsys.readouterr().out.strip().endswith(expected[name].strip())
    session.command("/use nobody")
    assert "no model named 'nobody'" in capsys.readouterr().out and session.name == "a"


def test_chat_loads_adapters_trained_anywhere_on_a_model(runs, tiny_llama, capsys):
    from affiner import cli

    capsys.readouterr()
    cli.main(["chat", "--model", str(tiny_llama), "--adapter", str(runs[1]), "--adapter", str(runs[0]),
              "--template", "chat", "--greedy", "--max-new-tokens", "8", "--prompt", QUESTION[0]["content"]])
    with_adapter = capsys.readouterr().out.strip()
    engine = Engine.from_runs([runs[1]], names=["b"])
    from affiner.interfaces.chat import answer

    assert with_adapter == answer(engine, "b", QUESTION, GREEDY).text.strip()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["chat", str(runs[0]), "--adapter", str(runs[1])])
    assert exit_info.value.code == 2


def test_adapters_with_the_same_folder_name_get_distinct_names(tmp_path):
    """Two exports both have an adapter/ folder: chat, app and serve must still tell them apart."""
    from affiner.core.runfolder import model_names as adapter_names

    a, b = tmp_path / "exp-a" / "adapter", tmp_path / "exp-b" / "adapter"
    assert adapter_names([a]) == ["tuned"]
    assert adapter_names([a, b]) == ["exp-a/adapter", "exp-b/adapter"]
    assert adapter_names([tmp_path / "x" / "run", tmp_path / "y" / "other"]) == ["run", "other"]


def test_a_full_fine_tune_among_adapters_is_refused_before_loading(runs, tmp_path, tiny_llama, monkeypatch):
    from affiner.interfaces import engine as engine_module

    full = train(load_config(str(write_config(tmp_path, tiny_llama, "embedded:glossary-train.json",
                                              method="full", data={"template": "chat"}, train={"max_steps": 1}))))
    monkeypatch.setattr(engine_module, "load_for", lambda *a, **k: pytest.fail("the base was loaded"))
    for folders in ([runs[0], full], [full, runs[0]]):
        with pytest.raises(AffinerError, match=f"{full.name} is a full fine-tune"):
            Engine.from_runs(folders)


def test_chat_says_when_an_answer_is_empty_on_stderr_not_stdout(capsys):
    """A model that ends its turn at once printed a bare empty line; the answer (stdout) stays empty for scripts."""
    from affiner.interfaces.chat import answer

    class Silent:
        def stream(self, name, messages, settings, stop=None, reply=None):
            yield from ()

    class Talking:
        def stream(self, name, messages, settings, stop=None, reply=None):
            yield from (" It is", " X.")

    answer(Silent(), "tuned", [{"role": "user", "content": "Hi"}], Settings())
    out, err = capsys.readouterr()
    assert out == "\n" and "(empty answer: the model ended its turn at once)" in err
    answer(Talking(), "tuned", [{"role": "user", "content": "Hi"}], Settings())
    out, err = capsys.readouterr()
    assert out == "It is X.\n" and err == ""


def test_an_adapter_given_by_folder_is_prompted_with_its_saved_template(tmp_path, tiny_llama, capsys):
    """An export's adapter/ (or a run folder) holds template.json: `--model BASE --adapter DIR` prompts with it,
    system prompt included, as `chat RUN` does; a --template that contradicts it is refused."""
    from affiner import cli

    run = train(load_config(str(write_config(tmp_path, tiny_llama, "embedded:glossary-train.json",
                                             data={"template": "qa", "system_prompt": "Réponds en français."},
                                             train={"max_steps": 3, "learning_rate": 5e-2}))))
    asked = ["--greedy", "--max-new-tokens", "8", "--prompt", QUESTION[0]["content"]]
    capsys.readouterr()
    assert cli.main(["chat", str(run), *asked]) in (0, None)
    from_run = capsys.readouterr().out
    assert cli.main(["chat", "--model", str(tiny_llama), "--adapter", str(run), *asked]) in (0, None)
    assert capsys.readouterr().out == from_run
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["chat", "--model", str(tiny_llama), "--adapter", str(run), "--template", "alpaca", *asked])
    assert exit_info.value.code == 2
    assert "was trained with the 'qa' template" in capsys.readouterr().err


def test_chat_prompt_writes_the_answer_alone_on_stdout(runs):
    """`affiner chat RUN --prompt Q > answer.txt`: notes (the precision chosen, library warnings) go to stderr."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "AFFINER_CPU_BF16"}  # precision measured: its note printed
    done = subprocess.run([sys.executable, "-m", "affiner", "chat", str(runs[0]), "--prompt", "What does QUILT stand for?",
                           "--greedy", "--max-new-tokens", "12"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "note:" not in done.stdout and "Loading" not in done.stdout
    assert "pip install kernels" not in done.stderr  # bitsandbytes' advice to fetch optional kernels from the Hub


def test_chat_for_a_script_prints_the_answer_and_no_loading_bar(runs, capsys):
    """`chat RUN --prompt`: stdout the answer, stderr without the libraries' progress bars or developer notes."""
    from conftest import run_cli

    assert run_cli("chat", str(runs[0]), "--prompt", "What does QUILT stand for?", "--greedy",
                   "--max-new-tokens", "4") == 0
    out, err = capsys.readouterr()
    assert out.strip() and "Loading weights" not in err and "it/s]" not in err
