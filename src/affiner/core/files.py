"""File I/O every command shares: one atomic write, JSON and JSON Lines, and swapping a whole folder in.

An interrupted command (Ctrl-C, a full disk, a crash) must never leave half a file where a whole one
was, so every file affiner writes goes through `write_atomic`: a temporary file with a unique name
beside the target, flushed to disk, then renamed over it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from affiner.core.errors import AffinerError


def cache_root() -> Path:
    """Where affiner keeps what it can make again (converted models, base evaluations, replies): $AFFINER_CACHE,
    else ~/.cache/affiner."""
    return Path(os.environ.get("AFFINER_CACHE", Path.home() / ".cache" / "affiner"))


def write_atomic(path: Path, content: str | bytes) -> Path:
    """Replace `path` with `content` in one step: readers see the old file or the new one, never a mix."""
    write_together({Path(path): content})
    return Path(path)


def write_together(files: dict[Path, str | bytes]) -> None:
    """Write several files so that an interruption before the end leaves every earlier file as it was.

    Each is first written in full beside its target, under a unique name (pid and random suffix, so
    two writers never clobber each other's copy) with the user's usual permissions (mkstemp would
    make it private), flushed to disk; only then are they renamed over their targets.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, content in files.items():
            temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
            try:
                descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                staged.append((temporary, path))
                with os.fdopen(descriptor, "wb") as out:
                    out.write(content.encode("utf-8") if isinstance(content, str) else content)
                    out.flush()
                    os.fsync(out.fileno())
            # Named by the file asked for: a write error (a full disk) names none, and a folder where nothing can be
            # made would name the hidden copy, which means nothing to a user (as `folder_written_whole` does).
            except OSError as error:
                raise OSError(error.errno, error.strerror, str(path)) from error
        for temporary, path in staged:
            os.replace(temporary, path)
    finally:  # Ctrl-C included: the half files are ours to remove; the targets not yet replaced are untouched
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)


def is_text(value: str) -> bool:
    """Whether `value` can be written as UTF-8: a JSON or YAML escape such as \\ud800 without its pair makes a
    lone UTF-16 surrogate, which no file, tokenizer or terminal holds."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_text(data: Any, indent: int | None = 2) -> str:
    """Strict JSON: a non-finite number (a diverged loss, an infinite gradient norm) is written as null, since
    NaN and Infinity are not JSON and break other readers (jq, browsers, pandas' strict mode)."""
    return json.dumps(finite(data), indent=indent, ensure_ascii=False, allow_nan=False) + "\n"


def finite(data: Any) -> Any:
    """`data` with every non-finite float replaced by None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(value) for value in data]
    return data


def write_json(path: Path, data: Any, indent: int | None = 2) -> Path:
    return write_atomic(path, json_text(data, indent))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    return write_atomic(path, "".join(json_text(record, indent=None) for record in records))


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One line added at the end (a log); a reader skips a last line cut by a crash (see read_jsonl)."""
    with open(path, "a", encoding="utf-8") as out:
        out.write(json_text(record, indent=None))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a log, in order; a line cut by an interrupted write is skipped."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def check_replaceable(output: Path, overwrite: bool, marker: str, verb: str) -> None:
    """`output` may be new, or, with --overwrite, a folder an earlier `affiner VERB` wrote (it holds `marker`):
    a user's own folder is never replaced by mistake. What an earlier, killed `affiner VERB` left beside it
    is cleaned up first (its earlier folder put back if it was caught between two renames)."""
    output = output.resolve() if output.is_symlink() else output  # as folder_written_whole writes it
    if Path.cwd().resolve().is_relative_to(output.resolve()):  # `.`: it would be swapped from under the shell
        raise AffinerError(f"--output {output} is the current folder (or holds it); name a folder to create, "
                           f"e.g. --output {output / verb}.")
    cleaned = remove_leftovers(output.parent, named=output.name)
    if cleaned:
        print(f"note: cleaned what an interrupted affiner left in {output.parent}: {', '.join(cleaned)}",
              file=sys.stderr)
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):  # an empty folder holds nothing to lose
        return
    if not output.is_dir():
        raise AffinerError(f"{output} is a file, not a folder; pass another --output.")
    if not (output / marker).is_file():
        raise AffinerError(f"{output} exists and was not written by affiner {verb} (no {marker}): affiner never "
                           f"replaces a folder of yours. Pass another --output.")
    if not overwrite:
        raise AffinerError(f"{output} already exists; pass another --output, or --overwrite to replace it "
                           "(the old folder is only removed once the new one is complete).")


@contextmanager
def folder_written_whole(output: Path) -> Iterator[Path]:
    """A staging folder beside `output` to write into, moved into place (an earlier folder replaced) only
    when the block ends without error, and removed whatever happens: no half-written output, ever. An `output`
    that is a symbolic link is written where it leads (the link stays, and keeps leading to the new folder)."""
    output = output.resolve() if output.is_symlink() else output
    staging = output.with_name(f".{output.name}-staging-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()  # mode 0o777 less the umask, unlike mkdtemp's 0700: the result has the usual permissions
    except OSError as error:  # named by the folder asked for: the staging folder's name means nothing to a user
        file = next((p for p in output.parents if _a_file(p)), None)
        if file is not None:  # mkdir says "File exists" of the folder asked for
            raise NotADirectoryError(errno.ENOTDIR, "a file, not a folder", str(file)) from None
        raise OSError(error.errno, error.strerror, str(output)) from None
    try:
        yield staging
        replace_folder(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _a_file(path: Path) -> bool:
    try:
        return path.exists() and not path.is_dir()
    except OSError:  # a folder this user may not look into
        return False


def replace_folder(staging: Path, output: Path) -> None:
    """Move a completely written folder into place; an earlier one is removed only once the new one is there."""
    if not output.exists():
        staging.rename(output)
        return
    retired = output.with_name(f".{output.name}-old-{os.getpid()}")
    output.rename(retired)
    try:
        staging.rename(output)
    except OSError:
        retired.rename(output)  # the earlier folder stays as it was
        raise
    shutil.rmtree(retired)


# The names this module gives what it writes before moving it into place: temporary files, staging and
# retired folders, each with the writing process's PID; a checkpoint being saved ends in ".partial".
_LEFTOVER = re.compile(r"^\..+\.(?P<pid>\d+)-[0-9a-f]{8}\.partial$|^\..+-staging-(?P<staging>\d+)-[0-9a-f]{8}$"
                       r"|^\..+-old-(?P<retired>\d+)$")


def remove_leftovers(folder: Path, any_owner: bool = False, named: str | None = None) -> list[str]:
    """Remove what a killed writer left in `folder` (a kill -9 or a power cut skips every clean-up): the
    temporary files and folders of processes that no longer run, or, with `any_owner` (the caller holds
    the folder's lock), every "*.partial" entry; a folder retired by `replace_folder` whose replacement
    never arrived is put back instead. `named` limits it to what was written for that one entry (a folder the
    user owns may hold dotfiles of their own). Returns what was done, to be reported."""
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        if named and not entry.name.startswith((f".{named}-", f".{named}.")):
            continue
        match = _LEFTOVER.match(entry.name)
        pid = next((int(v) for v in match.groupdict().values() if v), None) if match else None
        stale = (pid is not None and not _alive(pid)) or (any_owner and entry.name.endswith(".partial"))
        if not stale:
            continue
        original = folder / entry.name[1:].rsplit("-old-", 1)[0] if match and match["retired"] else None
        if original is not None and not original.exists():  # killed between its two renames: put it back
            entry.rename(original)
            removed.append(f"{entry.name} (restored as {original.name})")
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# The one process writing a folder (a run, a sweep) holds this lock; the owner file says who, for a second writer.
LOCK_FILE = ".lock"
LOCK_OWNER = ".lock-owner.json"


@contextmanager
def sole_writer(folder: Path, command: str) -> Iterator[None]:
    """This process is `folder`'s one writer while the block runs; a second one is refused with the PID of the
    first. The lock is the operating system's (filelock): a writer that dies, even by kill -9, releases it, so a
    stale lock never blocks anyone."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise being_written(folder) from None
    try:
        write_json(folder / LOCK_OWNER, {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                         "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        yield
    finally:
        (folder / LOCK_OWNER).unlink(missing_ok=True)
        lock.release()


def has_writer(folder: Path) -> bool:
    """Whether a process is writing `folder` now (it holds the lock); a folder left by a process that died
    (kill -9, a crash, a restart) has none. Where it cannot be told (a read-only folder), True."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except (Timeout, OSError):
        return True
    lock.release()
    return False


def being_written(folder: Path) -> AffinerError:
    try:
        owner = read_json(folder / LOCK_OWNER)
        who = f"affiner {owner['command']}, PID {owner['pid']} on {owner['host']}, since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        who = "a process that has just started"
    return AffinerError(f"{folder} is being written by another affiner ({who}); wait for it to end, or stop it, "
                        "then try again.")


def usual_permissions(folder: Path) -> None:
    """The weights in `folder` readable as the umask allows: transformers' `save_pretrained` writes model.safetensors
    through a private temporary file (mode 0600), which other users of a shared export or run could not read. Only
    our own private weight files change; one that cannot is left as it is."""
    wanted = 0o666 & ~current_umask()
    for path in folder.glob("*.safetensors"):
        try:
            status = path.lstat()  # a link is left alone: what it leads to is not this folder's
            if stat.S_ISREG(status.st_mode) and status.st_uid == os.getuid() \
                    and stat.S_IMODE(status.st_mode) == 0o600 != wanted:
                path.chmod(wanted)
        except OSError:  # not ours after all, or a file system without permissions
            continue


def current_umask() -> int:
    """The process's umask, read without setting it (os.umask sets it, for every thread, while it reads it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
