"""The prompts' check `harness run` and `harness api` share (`harness.run.preflight.check_prompts`).

On the in-process double (its tokenizer counts; no model server): a job whose typical prompt
cannot fit one request's context is returned refused (not raised: `harness run` says it after
its banner, the API as the batch's error); a few rows past the context are a warning; a p99
candidate as long as those at which phase 1's sweep of this backend and model saw reuse stop is
a warning naming the report, and another server's sweep says nothing. The end-to-end behaviour
of each entry point is pinned by tests/test_api.py (context_too_small) and
tests/test_ollama_replay.py / tests/test_run_banner.py (`harness run`).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from harness.config import load_profile
from harness.engine.job import open_token_counter
from harness.errors import ConfigError
from harness.run.preflight import PromptCheck, check_prompts
from harness.run.resolve import resolve_run_config
from harness.run.settings import RunConfig
from harness.testing.doubles import InProcessDouble
from harness.workload import WorkItem, items_from_batch

RUBRIC = "Score this candidate from 0 to 10. " * 4


def config(tmp_path: Path) -> RunConfig:
    return resolve_run_config(
        profile="embedded", config=load_profile(tmp_path / "absent.yaml", "embedded")
    )


def items(*candidates: str) -> list[WorkItem]:
    return items_from_batch(
        [
            {
                "custom_id": f"row-{i}",
                "body": {
                    "messages": [
                        {"role": "system", "content": RUBRIC},
                        {"role": "user", "content": text},
                    ],
                    "max_tokens": 4,
                },
            }
            for i, text in enumerate(candidates)
        ]
    )


def check(
    tmp_path: Path, double: InProcessDouble, rows: list[WorkItem], report: Path | None = None
) -> PromptCheck:
    async def go() -> PromptCheck:
        async with open_token_counter(double) as counter:
            return await check_prompts(
                config(tmp_path),
                double,
                counter,
                rows,
                reuse_report=report or tmp_path / "reports" / "prefix_reuse_results.json",
            )

    return asyncio.run(go())


def test_prompts_that_fit_pass_with_their_lengths(tmp_path: Path) -> None:
    checked = check(tmp_path, InProcessDouble(), items("short one", "another short one"))
    assert checked.refused is None and checked.warnings == ()
    assert (checked.lengths.rows, checked.lengths.measured) == (2, 2)
    assert checked.lengths.prefix_tokens > 0 and checked.lengths.reply_tokens == 4


def test_a_typical_prompt_past_the_servers_context_is_refused_not_raised(tmp_path: Path) -> None:
    long = "word " * 200
    checked = check(tmp_path, InProcessDouble(n_ctx_per_slot=64), items(long, long, long))
    assert isinstance(checked.refused, ConfigError)
    message = str(checked.refused)
    # Capped to the server: the double's 64 tokens per request, not the default setting.
    assert "one request's context is 64 (MAX_CONTEXT_TOKENS, " in message
    assert "--ctx" in message


def test_a_few_rows_past_the_context_are_a_warning(tmp_path: Path) -> None:
    rows = items(*["short"] * 9, "word " * 200)
    checked = check(tmp_path, InProcessDouble(n_ctx_per_slot=256), rows)
    assert checked.refused is None
    (warning,) = checked.warnings
    assert "the longest row (row-9: " in warning
    assert "they will be recorded as errors, not sent" in warning


def sweep(path: Path, *, backend: str, model: str, falls_at: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "backend": {"name": backend, "model": model},
        "production_path": "chat",
        "reuse_falls_at_tokens": {"chat": falls_at},
    }
    path.write_text(json.dumps(report))
    return path


@pytest.mark.parametrize(
    ("backend", "model", "falls_at", "warned"),
    [
        ("double", "double", 1, True),  # this server's sweep: reuse fell at shorter candidates
        ("double", "double", 100_000, False),  # reuse held up to longer candidates
        ("ollama", "double", 1, False),  # another backend's sweep says nothing about this one
    ],
)
def test_the_reuse_warning_reads_phase_1s_sweep_of_the_same_server(
    tmp_path: Path, backend: str, model: str, falls_at: int, warned: bool
) -> None:
    report = sweep(
        tmp_path / "reports" / "prefix_reuse_results.json",
        backend=backend,
        model=model,
        falls_at=falls_at,
    )
    checked = check(tmp_path, InProcessDouble(), items("a candidate of a few words"), report)
    assert checked.refused is None
    if warned:
        (warning,) = checked.warnings
        assert f"which {report} saw the server stop reusing the whole rubric" in warning
        assert "(from ~1 tokens, chat path)" in warning
    else:
        assert checked.warnings == ()
