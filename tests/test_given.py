"""The options a caller gives, declared once (`harness.run.given.OPTIONS`): every command's
parser is built from the table, and what it parses lands in the same fields whichever command
parsed it."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from harness.api.cli import build_parser as api_parser
from harness.api.cli import settings_from
from harness.api.settings import ApiSettings
from harness.batchfiles import convert
from harness.cli import build_parser
from harness.run.given import OPTIONS, add_options, count, from_pytest, given, harness_options
from harness.run.options import BatchOptions, with_validated_job


def _sub(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command]  # type: ignore[no-any-return,attr-defined]


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize(
    ("command", "fields"),
    [
        ("run", {f.name for f in dataclasses.fields(BatchOptions)}),
        ("doctor", {f.name for f in dataclasses.fields(BatchOptions)}),
        ("api", {f.name for f in dataclasses.fields(ApiSettings)}),
        ("convert", set(inspect.signature(convert).parameters)),
    ],
)
def test_every_option_of_a_command_sets_a_field_of_what_it_builds(
    command: str, fields: set[str]
) -> None:
    mine = [o.name for o in OPTIONS if command in o.variants]
    assert mine, f"{command} takes no option from the table"
    assert set(mine) <= fields, f"{command}: no field for {sorted(set(mine) - fields)}"


@pytest.mark.parametrize("command", ["run", "api", "doctor", "convert"])
def test_each_parser_declares_the_tables_options_for_it(command: str) -> None:
    parser = api_parser() if command == "api" else _sub(command)
    wanted = {o.flag for o in OPTIONS if command in o.variants}
    assert wanted <= _flags(parser)


def test_harness_api_takes_harness_runs_server_options_from_one_row_each() -> None:
    """The server options of `harness run` are `harness api`'s too (the issue's list)."""
    shared = {"--servers", "--request-path", "--server-flags", "--threads", "--concurrency",
              "--ctx", "--strategy", "--backend", "--model", "--base-url", "--config",
              "--profile"}  # fmt: skip
    assert shared <= _flags(api_parser()) & _flags(_sub("run"))
    for flag in shared:
        assert sum(o.flag == flag for o in OPTIONS) == 1, flag


def test_the_same_options_give_the_same_settings_to_harness_run_and_harness_api(
    tmp_path: Path,
) -> None:
    argv = ["--servers", "3", "--request-path", "chat", "--server-flags", "harness",
            "--threads", "2", "--ctx", "512", "--concurrency", "4", "--strategy", "conversation",
            "--profile", "embedded", "--config", str(tmp_path / "h.yaml"), "--model", "m.gguf",
            "--stop-on-cache-miss"]  # fmt: skip
    run_args = _sub("run").parse_args(["in.csv", *argv])
    run = BatchOptions(
        input=Path("in.csv"), **with_validated_job(Path("in.csv"), given(run_args, "run"))
    )
    api = settings_from(api_parser().parse_args(argv)).batch_options()
    for name in ("servers", "request_path", "server_flags", "threads", "ctx", "concurrency",
                 "strategy", "profile", "config", "model", "backend"):  # fmt: skip
        assert getattr(run, name) == getattr(api, name), name
    assert run.servers == 3 and run.config == tmp_path / "h.yaml"
    assert settings_from(api_parser().parse_args(argv)).stop_on_cache_miss is True


def test_several_base_urls_become_one_comma_list() -> None:
    args = _sub("run").parse_args(["x.jsonl", "--base-url", "http://a/v1", "--base-url", "b"])
    assert given(args, "run", "base_url") == {"base_url": "http://a/v1,b"}
    args = api_parser().parse_args(["--base-url", "http://a/v1,http://b/v1"])
    assert given(args, "api", "base_url") == {"base_url": "http://a/v1,http://b/v1"}


def test_an_option_asked_of_a_command_that_does_not_take_it_is_a_mistake() -> None:
    with pytest.raises(KeyError, match="--executor is not an option of 'api'"):
        add_options(argparse.ArgumentParser(), "api", "executor")


def test_the_harness_options_of_pytest_read_back_by_field() -> None:
    flags = [flag for flag, _ in harness_options()]
    assert flags == [
        "--harness-backend", "--harness-model", "--harness-base-url", "--harness-input",
        "--harness-id-column", "--harness-prompt", "--harness-score-mode", "--harness-threads",
        "--harness-config", "--harness-profile",
    ]  # fmt: skip
    option = argparse.Namespace(harness_backend="ollama", harness_threads=2)
    got = from_pytest(option)
    assert got["backend"] == "ollama" and got["threads"] == 2 and got["model"] is None
    for _, kw in harness_options("threads", "backend"):
        with pytest.raises(ValueError):
            kw["type"]("0" if kw["dest"] == "harness_threads" else "nope")


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("12", 12), ("1_000", 1000)])
def test_a_count_reads_whole_numbers_as_python_does(text: str, value: int) -> None:
    assert count(text) == value


@pytest.mark.parametrize("text", ["_10", "1__0", "10_", "-1", "1.5", "ten"])
def test_a_count_refuses_what_is_not_a_whole_number_or_is_negative(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(text)):
        count(text)
