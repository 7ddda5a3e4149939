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
from harness.config import JobRecord, record_job
from harness.run.given import (
    JOB_DATA,
    OPTIONS,
    Given,
    add_options,
    count,
    from_pytest,
    given,
    harness_options,
)
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


def test_what_a_caller_gave_is_one_frozen_value_for_every_command() -> None:
    run = given(_sub("run").parse_args(["in.csv", "--concurrency", "2"]), "run")
    doctor = given(_sub("doctor").parse_args(["in.csv"]), "doctor")
    api = given(api_parser().parse_args(["--concurrency", "2"]), "api")
    pyt = from_pytest(argparse.Namespace(harness_backend="ollama"))
    for g in (run, doctor, api, pyt):
        assert isinstance(g, Given)
        with pytest.raises(dataclasses.FrozenInstanceError):
            g.command = "x"  # type: ignore[misc]
        with pytest.raises(TypeError):
            g.settings["backend"] = "x"  # type: ignore[index]
    assert (run.command, doctor.command, api.command, pyt.command) == (
        "run",
        "doctor",
        "api",
        "pytest",
    )
    assert run["concurrency"] == api["concurrency"] == 2
    # Left out is None, so that a validated job can fill it: run and doctor alike.
    assert run["backend"] is run["id_column"] is doctor["backend"] is doctor["id_column"] is None


def _recorded(tmp_path: Path, **kw: object) -> tuple[Path, Path]:
    cands, config = tmp_path / "cands.csv", tmp_path / "harness.yaml"
    cands.write_text("candidate_id,resume_text\nA,x\n")
    fields: dict[str, object] = {
        "input": cands.resolve(), "prompt": tmp_path / "rubric.yaml", "prompt_sha256": "ab",
        "id_column": "candidate_id", "profile": "embedded", "backend": "embedded",
        "model": "tiny-gemma3", **kw,
    }  # fmt: skip
    record_job(config, JobRecord(**fields))  # type: ignore[arg-type]
    return cands, config


def test_the_validated_job_fills_what_the_caller_left_out_and_its_server_only_for_its_backend(
    tmp_path: Path,
) -> None:
    cands, config = _recorded(tmp_path)
    args = ["run", str(cands), "--config", str(config)]
    kw = with_validated_job(cands, given(build_parser().parse_args(args), "run"))
    assert (kw["backend"], kw["model"], kw["id_column"]) == ("embedded", "tiny-gemma3",
                                                             "candidate_id")  # fmt: skip
    # Another backend: the job's rows and prompt, not the stand-in's model or profile.
    kw = with_validated_job(
        cands, given(build_parser().parse_args([*args, "--backend", "ollama"]), "run")
    )
    assert kw["backend"] == "ollama" and kw["model"] is None and kw["profile"] is None
    assert kw["prompt"] == tmp_path / "rubric.yaml" and kw["id_column"] == "candidate_id"
    assert set(kw["from_validated"]) == {"prompt", "id_column"}
    # The pytest options take the job's data only (the server is the one the phase measures).
    pyt = from_pytest(argparse.Namespace(harness_input=str(cands))).with_validated_job(
        cands, config, fields=JOB_DATA
    )
    assert pyt.from_validated == ("prompt", "id_column")
    assert pyt["backend"] is None and pyt["model"] is None
