"""One writer at a time: an exclusive lock beside what a process writes.

`hold(lock_path, what=...)` takes an exclusive `fcntl.flock` on `lock_path` (created if need be)
for as long as the `with` block runs. The operating system releases it when the process ends,
however it ends: a SIGKILLed writer never leaves a stale lock behind, and nothing has to be
cleaned up by hand. The holder writes its pid and command line into the file, readable by its
owner only, so a second writer can say who holds it: `LockHeld`, one line naming the pid and
the command.

Secrets never reach that note nor a message. They are redacted by what was parsed, not by how
the option was spelled: an option that carries one declares `type=secret` (argparse calls it with
the value, whichever spelling the user typed), a secret read elsewhere (`HARNESS_API_KEY`) is
noted with `keep_secret`, and `redacted` / `scrubbed` replace every noted value by `***`. The
spelled names in `SECRET_OPTIONS`, and any prefix of them (an abbreviation a parser refused,
whose value was never parsed), hide the value that follows them too.

The holder removes the lock file as it lets go (nothing is left beside the results); one a
SIGKILLed holder left behind is simply locked again. Removal is safe because a process that
got the lock checks that the file it locked is still the one at that path (same inode), and
tries again if not: a second process that opened the old file just before it was removed
cannot then run next to a third that created a new one.

Who takes one: `harness run` on `<results>.lock` (the Ray executor's driver is that process),
`harness api` on its data dir (`<data dir>/harness-api.lock`), `harness generate` and `harness
convert` on the file they replace (`<output>.lock`, while they write it), and the suites'
write-back on `harness.yaml.lock` while they read, change and replace the config file (waiting
their turn: two sessions writing back at once would otherwise lose one's values).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from harness.errors import LockHeld

__all__ = [
    "SECRET_OPTIONS",
    "hold",
    "holder_of",
    "keep_secret",
    "lock_path_for",
    "redacted",
    "scrubbed",
    "secret",
]

SECRET_OPTIONS = ("--api-key",)
"""Options whose value is never written to a lock file nor shown in a message (each declares
`type=secret`; tests/test_secrets.py checks that every option that does is listed here)."""

_SECRETS: set[str] = set()
"""The secret values this process parsed or read (`secret`, `keep_secret`)."""


def keep_secret(value: str | None) -> None:
    """Note `value` as a secret of this process: `redacted` and `scrubbed` hide it from now on."""
    if value:
        _SECRETS.add(value)


def secret(value: str) -> str:
    """The argparse `type=` of an option that carries a secret: the value, noted as one."""
    keep_secret(value)
    return value


def _secret_name(name: str) -> bool:
    """`name` is a secret option, or a prefix of one (`--api-k`: an abbreviation)."""
    return (
        len(name) > 2 and name.startswith("--") and any(o.startswith(name) for o in SECRET_OPTIONS)
    )


def _hide_values(text: str) -> str:
    for value in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def lock_path_for(path: Path) -> Path:
    """The lock beside a file: `<path>.lock` (`c_results.jsonl.lock`)."""
    return path.with_name(path.name + ".lock")


def redacted(argv: Sequence[str]) -> str:
    """A command line with every secret replaced by `***`: each value noted as one (however
    its option was spelled), and the value after a `SECRET_OPTIONS` name or a prefix of one."""
    out: list[str] = []
    hide = False
    for arg in argv:
        if hide:
            out.append("***")
            hide = False
            continue
        name, eq, _ = arg.partition("=")
        if _secret_name(name):
            if eq:
                out.append(f"{name}=***")
            else:
                out.append(arg)
                hide = True
            continue
        out.append(_hide_values(arg))
    return " ".join(out)


def scrubbed(message: str) -> str:
    """A message (an argparse error that echoes the command line, say) with every secret
    replaced by `***`, as `redacted` does for a command line."""
    return redacted(message.split(" "))


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):
        argv[0] = "python -m " + Path(argv[0]).parent.name
    return redacted(argv)


def holder_of(lock_path: Path) -> str:
    """What the lock file says about its holder: `pid N (command), since HH:MM:SS`."""
    try:
        text = lock_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    pid, _, rest = text.partition("\n")
    command, _, since = rest.partition("\n")
    if not pid.strip().isdigit():
        return "a process that has not written its pid yet"
    out = f"pid {pid.strip()}"
    if command.strip():
        out += f" ({command.strip()})"
    if since.strip():
        out += f", since {since.strip()}"
    return out


def _named_holder(lock_path: Path, wait_s: float = 1.0) -> str:
    """`holder_of`, giving a holder that has just locked the file (its note not written yet)
    up to `wait_s` to write it: two writers started together must still name each other."""
    deadline = time.monotonic() + wait_s
    while True:
        who = holder_of(lock_path)
        if not who.startswith("a process that has not") or time.monotonic() >= deadline:
            return who
        time.sleep(0.02)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _locked_fd(lock_path: Path, what: str, advice: str, wait_s: float) -> int:
    """An open descriptor of `lock_path` holding its exclusive lock, waiting up to `wait_s`
    for it (see the module docstring for why the file is checked after locking)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise LockHeld(
                f"cannot create the lock {lock_path} for {what}: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise LockHeld(
                f"{what} is in use by another process: {_named_holder(lock_path)}"
                + (f"; {advice}" if advice else "")
                + f" (lock: {lock_path})"
            ) from None
        if _same_file(fd, lock_path):
            return fd
        os.close(fd)  # its holder removed it as we locked it: lock the file there now


@contextlib.contextmanager
def hold(lock_path: Path, *, what: str, advice: str = "", wait_s: float = 0.0) -> Iterator[None]:
    """Hold the exclusive lock on `lock_path` while the block runs; raise `LockHeld` (naming
    `what`, the holder's pid and command, and `advice`) when another process holds it for
    longer than `wait_s` (0: at once; a writer of a few milliseconds, such as the config
    write-back, waits its turn instead)."""
    fd = _locked_fd(lock_path, what, advice, wait_s)
    try:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        note = f"{os.getpid()}\n{_command()}\n{stamp}\n".encode()
        with contextlib.suppress(OSError):  # the note only helps a second writer's message
            os.fchmod(fd, 0o600)  # the owner's: a file left by an older version was 0644
            os.ftruncate(fd, 0)
            os.pwrite(fd, note, 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            if _same_file(fd, lock_path):
                lock_path.unlink()  # still held: nobody can lock this file after us
        os.close(fd)  # releases the lock
