"""Launching an external serving engine for `affiner serve --engine vllm|llama.cpp`: find it, check what
must hold before it starts (the host and key rules of affiner's own server), and run it in the
foreground until it exits or Ctrl-C stops it.

The command itself is built, and the files it needs written, by `affiner.export.engines`; this module
only starts it. An engine reads its API key from the environment (VLLM_API_KEY, LLAMA_API_KEY), never
from its argv, which every user of the machine can read with ps.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from affiner.core.errors import AffinerError
from affiner.core.net import is_loopback
from affiner.core.net import read_api_key

INSTALL = {"vllm": "pip install vllm (vLLM needs a CUDA GPU)",
           "llama.cpp": "pip install 'llama-cpp-python[server]', or put llama.cpp's llama-server on PATH "
                        "(https://github.com/ggml-org/llama.cpp)"}
KEY_VARIABLES = {"vllm": "VLLM_API_KEY", "llama-server": "LLAMA_API_KEY"}
STOP_SECONDS = 30  # how long an engine may take to shut down after Ctrl-C before it is terminated


@dataclass(frozen=True)
class Launcher:
    name: str  # vllm, llama-server or llama_cpp.server
    program: tuple[str, ...]  # the argv that starts it


def find_launcher(engine: str) -> Launcher:
    """How to start `engine` on this machine: its command, else its Python module; else an error saying how to
    install it."""
    if engine == "vllm":
        command = _command("vllm")
        if command:
            return Launcher("vllm", (command,))
        if installed("vllm"):
            return Launcher("vllm", (sys.executable, "-m", "vllm.entrypoints.cli.main"))
    elif engine == "llama.cpp":
        command = _command("llama-server")
        if command:
            return Launcher("llama-server", (command,))
        if installed("llama_cpp", "server"):
            return Launcher("llama_cpp.server", (sys.executable, "-m", "llama_cpp.server"))
    else:
        raise AffinerError(f"unknown --engine '{engine}'; supported: affiner, {', '.join(INSTALL)}.")
    raise AffinerError(f"--engine {engine}: {engine} is not installed here. Install it with {INSTALL[engine]}; "
                       "or serve with affiner's own server (--engine affiner, the default).")


def _command(name: str) -> str | None:
    """`name` beside this Python (a virtual environment's scripts, activated or not), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def installed(package: str, sub: str | None = None) -> bool:
    """Whether `package` (and its subpackage `sub`) is installed, without importing it: llama_cpp loads a native
    library on import."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return False
    return sub is None or (Path(spec.origin).parent / sub).is_dir()


def engine_environment(launcher: Launcher, host: str, port: int, api_key_env: str | None) -> dict[str, str]:
    """The environment entries the engine needs (its API key), after refusing what affiner's own server refuses:
    a public address without a key."""
    if port == 0:
        raise AffinerError("--port 0 (a free port) works with --engine affiner only; give the port the engine "
                           "should listen on.")
    key = read_api_key(api_key_env)
    if key is None and not is_loopback(host):
        raise AffinerError(f"refusing to serve on {host or 'all interfaces'} without an API key: anyone who can "
                           "reach this machine could use the models. Put a key in an environment variable and pass "
                           "its name: export AFFINER_KEY=$(openssl rand -hex 16), then --api-key-env AFFINER_KEY.")
    if key is None:
        print(f"note: {launcher.name} does not check the Host header as affiner's own server does, so a web page "
              "open in a browser on this machine could reach it; --api-key-env closes that.")
        return {}
    if launcher.name not in KEY_VARIABLES:
        raise AffinerError(f"--api-key-env: {launcher.name} takes its key only from its config file, which affiner "
                           "does not write keys into; install llama.cpp's llama-server, or serve without a key on "
                           "127.0.0.1.")
    return {KEY_VARIABLES[launcher.name]: key}


def run_engine(argv: list[str], env: dict[str, str]) -> None:
    """Run the engine in the foreground until it exits (an error unless it exits cleanly) or Ctrl-C."""
    print(f"Starting {shlex.join(argv)}", flush=True)
    try:
        process = subprocess.Popen(argv, env={**os.environ, **env})
    except OSError as exc:
        raise AffinerError(f"cannot start {argv[0]}: {exc.strerror or exc}.") from None
    try:
        code = process.wait()
    except KeyboardInterrupt:
        print("\nstopping", file=sys.stderr)
        stop(process)
        return
    if code != 0:
        raise AffinerError(f"{Path(argv[0]).name} stopped with exit code {code}; its messages are above.")


def stop(process: subprocess.Popen) -> int:
    """Ctrl-C reached the engine too (same terminal); it gets time to shut down cleanly, then is ended."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            return process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()
