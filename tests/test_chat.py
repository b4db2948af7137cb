"""The chat program driven as a person would, in tmux: type, read the screen, change settings, leave."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from affiner.core.config import load_config
from affiner.training.run import train
from conftest import write_config

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")


def _screen(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session, "-S", "-200"], capture_output=True,
                          text=True).stdout


def _wait_for(session: str, predicate, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        screen = _screen(session)
        if predicate(screen):
            return screen
        time.sleep(0.2)
    raise AssertionError(f"screen never matched; last screen:\n{_screen(session)}")


def _type(session: str, text: str) -> None:
    subprocess.run(["tmux", "send-keys", "-t", session, "-l", text], check=True)
    subprocess.run(["tmux", "send-keys", "-t", session, "Enter"], check=True)


def _keys(session: str, *keys: str) -> None:
    subprocess.run(["tmux", "send-keys", "-t", session, *keys], check=True)


def _alive(session: str) -> bool:
    return subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode == 0


def test_chat_session_in_a_terminal(tmp_path, tiny_llama):
    run = train(load_config(str(write_config(tmp_path, tiny_llama, "embedded:glossary-train.json",
                                             data={"template": "chat"}))))
    session = f"affiner-chat-{tmp_path.name}"
    cache = tmp_path / "cache"  # where the line history is kept
    command = (f"AFFINER_CACHE={cache} {sys.executable} -m affiner chat {run} --greedy --max-new-tokens 60; "
               "echo CHAT-ENDED-$?; sleep 30")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "60", command], check=True)
    try:
        _wait_for(session, lambda s: "Chatting with" in s and "multi-turn" in s)
        _type(session, "What does QUILT stand for?")
        screen = _wait_for(session, lambda s: s.count("\n> ") >= 2 or s.rstrip().endswith(">"))
        answer = screen.split("What does QUILT stand for?", 1)[1].split("\n> ", 1)[0]
        assert answer.strip(), screen  # the streamed answer is on screen before the next prompt

        _type(session, "/set temperature=0.5 top_k=7")
        _wait_for(session, lambda s: "temperature=0.5" in s and "top_k=7" in s)
        _type(session, "/set temperature=hot")
        _wait_for(session, lambda s: "temperature must be a float" in s)

        _type(session, "Define FROND.")  # Ctrl-C right away: the answer stops, the program goes on
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        _type(session, "/settings")
        _wait_for(session, lambda s: s.count("temperature=0.5") >= 2)
        assert _alive(session)

        _type(session, "/reset")
        _wait_for(session, lambda s: "(conversation cleared)" in s)
        _keys(session, "Up")  # readline recalls the previous line, ready to be sent again or edited
        screen = _wait_for(session, lambda s: s.rstrip().endswith("> /reset"))
        assert "^[[A" not in screen and "\x1b[A" not in screen
        _keys(session, "Enter")
        _wait_for(session, lambda s: s.count("(conversation cleared)") == 2)
        shown = _screen(session).count("temperature=0.5")
        _keys(session, "Up", "Up")  # further back: /reset (kept once, as bash does), then /settings
        _wait_for(session, lambda s: s.rstrip().endswith("> /settings"))
        _keys(session, "Enter")
        _wait_for(session, lambda s: s.count("temperature=0.5") == shown + 1)
        assert "CHAT-ENDED" not in _screen(session)
        _type(session, "exit")
        screen = _wait_for(session, lambda s: "CHAT-ENDED-" in s, timeout=20)
        assert "CHAT-ENDED-0" in screen and "Traceback" not in screen
        history = (cache / "chat_history").read_text(encoding="utf-8").splitlines()
        assert history[0] == "What does QUILT stand for?" and history[-4:] == ["/settings", "/reset", "/settings", "exit"]
        assert (cache / "chat_history").stat().st_mode & 0o077 == 0  # the questions asked: the owner's only
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
