"""What chat reads from the keyboard, without a terminal: messages of several lines, Ctrl-C before an answer."""

from __future__ import annotations

import builtins
import os
import signal
import threading
import time

import pytest

from affiner.core.settings import Settings
from affiner.interfaces import chat
from affiner.interfaces.engine import Reply


@pytest.mark.parametrize("first, typed, expected", [
    ('"""', ["Translate to French:", "The cat sleeps.", '"""'], "Translate to French:\nThe cat sleeps."),
    ('"""Summarise:', ["  indented line", 'last line"""'], "Summarise:\n  indented line\nlast line"),
    ('"""one line"""', [], "one line"),
])
def test_a_message_of_several_lines_is_read_whole(monkeypatch, first, typed, expected):
    lines = iter(typed)
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    assert chat.read_block(first) == expected
    assert next(lines, None) is None  # nothing read past the closing quotes


class SlowToRead:
    """An engine still reading a long prompt: nothing streams until it is told to stop."""

    def stream(self, name, messages, settings, stop, reply):
        stop.wait(60)
        yield from ()


def test_ctrl_c_before_the_answer_begins_says_it_is_stopping_at_once(capsys):
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    started = time.perf_counter()
    timer.start()
    reply = chat.answer(SlowToRead(), "tuned", [{"role": "user", "content": "a long paste"}], Settings())
    assert time.perf_counter() - started < 10 and isinstance(reply, Reply)
    out, err = capsys.readouterr()
    assert "(stopping: the model stops once it has read the prompt)" in err and "[stopped]" in out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C as before once answered


class Scripted:
    """An engine whose answer ends as `how` says: at the answer limit, at a new turn, or with its stop token."""

    def __init__(self, how: str):
        self.how = how

    def stream(self, name, messages, settings, stop, reply):
        reply.text, reply.tokens = "Step 1: Load the", settings.max_new_tokens if self.how == "limit" else 4
        reply.stopped, reply.new_turn = self.how == "stop", self.how == "new turn"
        yield reply.text


@pytest.mark.parametrize("how, said", [
    ("limit", "(cut at the answer limit (30 tokens): it did not stop by itself (/set max_new_tokens=N, or "
              "--max-new-tokens N))"),
    ("new turn", "(cut where the model began a new turn: it did not stop by itself)"),
    ("stop", ""),
])
def test_an_answer_that_did_not_stop_by_itself_says_so(capsys, how, said):
    """A base model cut at the limit mid-sentence otherwise reads as an answer that ended there."""
    chat.answer(Scripted(how), "base", [{"role": "user", "content": "How?"}], Settings(max_new_tokens=30))
    out, err = capsys.readouterr()
    assert out == "Step 1: Load the\n" and err.strip() == said  # the answer alone on stdout, for scripts


@pytest.mark.parametrize("is_chat, said", [(True, "the conversation so far is kept"), (False, "one question at a time")])
def test_switching_models_says_what_the_template_keeps(capsys, is_chat, said):
    from types import SimpleNamespace

    engine = SimpleNamespace(names=["base", "tuned"], template=SimpleNamespace(is_chat=is_chat, name="qa"))
    session = chat.Session(engine, "tuned", Settings())
    session.command("/use base")
    assert session.name == "base" and capsys.readouterr().out.strip() == f"(now talking to base; {said})"


def test_a_one_shot_answer_cut_by_ctrl_c_exits_as_interrupted_with_stdout_holding_only_the_answer(capsys):
    """--prompt: a script must not take a cut answer for a whole one (no marker on stdout, Ctrl-C passed on)."""
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        chat.answer(SlowToRead(), "tuned", [{"role": "user", "content": "a long paste"}], Settings(), one_shot=True)
    out, _ = capsys.readouterr()
    assert "[stopped]" not in out and out.strip() == ""


class EndsOnANewLine:
    """An engine whose streamed answer ends with the line break that came before a new turn it then cut."""

    def stream(self, name, messages, settings, stop, reply):
        reply.new_turn, reply.tokens = True, 6
        yield from [" Made of", " two layers.", "\n", "\n"]


def test_the_line_breaks_before_a_cut_turn_never_reach_stdout(capsys):
    chat.answer(EndsOnANewLine(), "base", [{"role": "user", "content": "What?"}], Settings())
    assert capsys.readouterr().out == "Made of two layers.\n"


def test_a_set_line_with_one_bad_value_changes_nothing_and_a_seed_can_be_cleared(capsys):
    from types import SimpleNamespace

    session = chat.Session(SimpleNamespace(names=["base"], template=None), "base", Settings(temperature=0.5, seed=3))
    session.command("/set temperature=0.7 top_k=bad")
    assert session.settings == Settings(temperature=0.5, seed=3) and "nothing changed" in capsys.readouterr().out
    session.command("/set seed=none temperature=0.9")
    assert session.settings == Settings(temperature=0.9, seed=None)
