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
