"""One writer per file (`harness.lock`): a second holder is refused naming the first, a
SIGKILLed holder leaves no stale lock, secrets never reach the lock file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import lock
from harness.errors import LockHeld
from harness.lock import hold, lock_path_for, redacted

HOLDER = """
import sys, time
from pathlib import Path
from harness.lock import hold
with hold(Path(sys.argv[1]), what="the test file"):
    print("held", flush=True)
    time.sleep(300)
"""


def start_holder(path: Path, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), *extra],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_naming_the_pid_and_command_and_sigkill_frees_it(
    tmp_path: Path,
) -> None:
    path = lock_path_for(tmp_path / "r.jsonl")
    assert path.name == "r.jsonl.lock"
    proc = start_holder(path, "--api-key", "hk-secret-123456", "--api-key=hk-secret-2")
    try:
        with pytest.raises(LockHeld) as held, hold(path, what="the results file r.jsonl"):
            pass
        message = str(held.value)
        assert "\n" not in message
        assert message.startswith("the results file r.jsonl is in use by another process")
        assert f"pid {proc.pid} (" in message and "since " in message
        assert "--api-key ***" in message and "--api-key=***" in message
        assert "hk-secret" not in message and b"hk-secret" not in path.read_bytes()
        # SIGKILL: no chance to let go, yet the OS releases the lock with the process.
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        with hold(path, what="the results file r.jsonl"):
            assert path.read_text().split("\n")[0] == str(os.getpid())
        assert not path.exists()  # removed as it was let go
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_the_same_process_cannot_hold_it_twice(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with (
        hold(path, what="x"),
        pytest.raises(LockHeld, match=f"pid {os.getpid()}"),
        hold(path, what="x"),
    ):
        pass
    with hold(path, what="x"):  # free again
        pass


def test_a_lock_file_removed_as_it_was_locked_is_taken_again_at_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race removal opens: a process opened the lock file just before its holder removed
    it. Locking that old file must not count: it locks the file now at the path."""
    path = tmp_path / "x.lock"
    stale = tmp_path / "stale"
    stale.write_text("")
    real_open = os.open
    calls: list[str] = []

    def opening(name: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        calls.append(str(name))
        if len(calls) == 1:  # as if it opened the file a holder then removed
            fd = real_open(stale, flags, mode)
            stale.unlink()
            return fd
        return real_open(name, flags, mode)

    monkeypatch.setattr(lock.os, "open", opening)
    with hold(path, what="x"):
        assert len(calls) == 2 and path.exists()
        monkeypatch.setattr(lock.os, "open", real_open)
        with pytest.raises(LockHeld), hold(path, what="x"):
            pass


def test_secret_option_values_are_redacted() -> None:
    assert redacted(["harness", "api", "--api-key", "k1", "--port", "1", "--api-key=k2"]) == (
        "harness api --api-key *** --port 1 --api-key=***"
    )


def test_a_holder_that_has_not_written_its_note_yet_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    path.write_text("")
    assert lock.holder_of(path) == "a process that has not written its pid yet"
    path.write_text(f"123\nharness run c.csv\n{time.strftime('%Y')}\n")
    assert lock.holder_of(path).startswith("pid 123 (harness run c.csv), since ")


WRITER = """
import sys
from harness.config import write_back
path, profile = sys.argv[1], sys.argv[2]
for n in range(1, 31):
    write_back(path, profile, {"CONCURRENCY": n}, {"report": "test", "n": n})
"""


def test_concurrent_write_backs_to_one_config_file_lose_no_profile(tmp_path: Path) -> None:
    """Four sessions writing back to one harness.yaml at once (each its own profile, 30 times):
    each reads, changes and replaces the file under its lock, so none replaces the file with a
    copy that lacks another's values."""
    from harness.config import load_profile

    path = tmp_path / "harness.yaml"
    profiles = ["embedded", "gpu-gemma3-12b", "p3", "p4"]
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), p], stderr=subprocess.PIPE)
        for p in profiles
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    for profile in profiles:
        assert load_profile(path, profile).values["CONCURRENCY"] == 30, profile
    assert not lock_path_for(path).exists()
