"""A secret never reaches a file or a message, however its option was spelled.

Every option of every harness parser that carries a secret declares `type=harness.lock.secret`;
argparse would once have accepted any unambiguous prefix of it (`--api-k`). Here each such
option, spelled each way argparse would have accepted with abbreviations on, must leave its
value out of the lock note (the file a second process reads), out of the second process's
error, and out of every usage error; and no parser accepts an abbreviation any more.
"""

from __future__ import annotations

import argparse
import itertools
import secrets
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import lock
from harness.api import cli as api_cli
from harness.api.service import data_dir_lock
from harness.api.settings import API_KEY_ENV
from harness.cli import build_parser
from harness.errors import LockHeld

_SERIAL = itertools.count()


def parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the `harness` command: the top one, each subcommand's, `harness api`'s."""
    top = build_parser()
    yield "harness", top
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"harness {name}", sub
    yield "harness api", api_cli.build_parser()


def secret_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [
        flag
        for action in parser._actions
        if action.type is lock.secret
        for flag in action.option_strings
        if flag.startswith("--")
    ]


def spellings(parser: argparse.ArgumentParser, flag: str) -> list[str]:
    """`flag` and each prefix of it that argparse, abbreviations allowed, would have taken for
    it (no other long option of the parser starts with it)."""
    longs = [s for s in parser._option_string_actions if s.startswith("--")]
    return [
        flag[:n]
        for n in range(3, len(flag) + 1)
        if [s for s in longs if s.startswith(flag[:n])] == [flag]
    ]


CASES = [
    (prog, flag, spelled, joined)
    for prog, parser in parsers()
    for flag in secret_flags(parser)
    for spelled in spellings(parser, flag)
    for joined in (False, True)
]


def key() -> str:
    return f"S3CRET{next(_SERIAL)}{secrets.token_hex(6)}"


def test_every_secret_option_is_declared_as_one_and_no_parser_abbreviates() -> None:
    found = {(prog, flag) for prog, parser in parsers() for flag in secret_flags(parser)}
    assert ("harness api", "--api-key") in found
    assert {flag for _, flag in found} <= set(lock.SECRET_OPTIONS)
    for prog, parser in parsers():
        assert parser.allow_abbrev is False, prog
    # The cases below cover the abbreviations argparse once took: --api-k, --api-ke, ...
    assert {s for p, f, s, _ in CASES if p == "harness api"} >= {"--api-k", "--api-ke"}


@pytest.mark.parametrize(("prog", "flag", "spelled", "joined"), CASES)
def test_a_secret_spelled_any_way_reaches_no_file_and_no_message(
    prog: str,
    flag: str,
    spelled: str,
    joined: bool,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parser = dict(parsers())[prog]
    value = key()
    argv = [f"{spelled}={value}"] if joined else [spelled, value]
    monkeypatch.setattr(sys, "argv", [*prog.split(), *argv])
    if spelled != flag:  # an abbreviation: refused, and its value not echoed
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(argv)
        assert exited.value.code == 2
        out, err = capsys.readouterr()
        assert "unrecognized arguments" in err and spelled in err
        assert value not in out + err
        return
    args = parser.parse_args(argv)
    assert value in vars(args).values()
    path = tmp_path / "x.lock"
    with lock.hold(path, what="the thing"):
        note = path.read_text()
        assert value not in note and f"{flag}{'=' if joined else ' '}***" in note
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # its owner's only
        with pytest.raises(LockHeld) as held, lock.hold(path, what="the thing"):
            pass
    assert value not in str(held.value) and "***" in str(held.value)


@pytest.mark.parametrize("spelled", ["--api-key", "--api-k", "--api-ke", "env"])
def test_harness_api_with_a_key_leaves_it_in_no_file_of_the_data_dir_nor_in_a_message(
    spelled: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reproduction: `harness api --port P --model tiny-gemma3 --data-dir D --api-k KEY`
    took the key and wrote it in clear into D's lock note (0644), and a second instance's error
    showed it. Now an abbreviation exits 2 creating nothing; the full spelling and the
    environment variable leave the key in no file under D and in no message of a second
    instance."""
    value = key()
    data = tmp_path / "data"
    argv = ["--port", "0", "--model", "tiny-gemma3", "--data-dir", str(data)]
    if spelled == "env":
        monkeypatch.setenv(API_KEY_ENV, value)
    else:
        monkeypatch.delenv(API_KEY_ENV, raising=False)
        argv += [spelled, value]
    monkeypatch.setattr(sys, "argv", ["harness", "api", *argv])
    if spelled.startswith("--api-k") and spelled != "--api-key":
        with pytest.raises(SystemExit):  # refused before anything starts (no hang if taken)
            api_cli.build_parser().parse_args(argv)
        with pytest.raises(SystemExit) as exited:  # argparse's usage error
            api_cli.main(argv)
        assert exited.value.code == 2
        assert value not in "".join(capsys.readouterr()) and not data.exists()
        return
    settings = api_cli.settings_from(api_cli.build_parser().parse_args(argv))
    assert settings.api_key == value
    with data_dir_lock(settings):  # the first service holds the data dir
        assert api_cli.main(argv) == 2  # a second one on it
        files = [p for p in data.rglob("*") if p.is_file()]
        assert files and all(value.encode() not in p.read_bytes() for p in files)
        assert stat.S_IMODE(settings.lock_path.stat().st_mode) == 0o600
    out, err = capsys.readouterr()
    assert "is in use by another process" in err and value not in out + err


def test_a_noted_secret_is_hidden_anywhere_and_a_refused_abbreviation_hides_its_value() -> None:
    value = key()
    lock.keep_secret(value)  # parsed (type=secret) or read from HARNESS_API_KEY
    assert lock.redacted(["harness", "api", "--profile", value, f"--x={value}"]) == (
        "harness api --profile *** --x=***"
    )
    assert lock.scrubbed(f"unrecognized arguments: --api-k {key()} --api=x --port 1") == (
        "unrecognized arguments: --api-k *** --api=*** --port 1"
    )
