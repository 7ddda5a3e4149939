"""A run whose server stops reusing the shared prefix says so while it runs, and stops when asked.

Logic on the in-process double (a server that reports 0 cached tokens from row k on); the same
through `harness run --stop-on-cache-miss` against the Ollama replay (integration).
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ollama_replay import OllamaReplay, counting

from harness.backends.base import ChatRequest, ChatResult
from harness.backends.embedded import EmbeddedServer
from harness.engine import JobSpec, read_results, run_job
from harness.engine.reusewatch import ReuseWatch, ReuseWatchConfig
from harness.engine.strategies import TrimPolicy
from harness.metrics import MetricsCollector
from harness.phases import scale_figures
from harness.records import RequestRecord
from harness.scenarios import Criterion, evaluate
from harness.testing import InProcessDouble
from harness.workload import (
    CandidateTable,
    generate_candidates,
    items_from_table,
    load_prompt,
    write_candidates_csv,
)

K = 70
"""The row from which the losing double reports no reuse."""


class LosingDouble(InProcessDouble):
    """The in-process double, whose cache is lost from its K-th request on (a prefix that
    stopped matching, an evicted cache): it reports 0 cached tokens."""

    def __init__(self, k: int = K) -> None:
        super().__init__()
        self.k = k

    async def chat(self, request: ChatRequest) -> ChatResult:
        result = await super().chat(request)  # counts `self.calls`
        if self.calls > self.k:
            result.usage.cached_tokens = 0
        return result


def items(n: int) -> list[Any]:
    rows = tuple(generate_candidates(n, seed=3))
    table = CandidateTable("generated", tuple(rows[0]), "id", rows, tuple(range(2, n + 2)))
    return items_from_table(table, load_prompt(None), max_tokens=8, structured="none")


def record(cid: str, prompt: int, cached: int, reusable: int) -> RequestRecord:
    return RequestRecord(cid, "ok", prompt_tokens=prompt, cached_tokens=cached,
                         reusable_tokens=reusable)  # fmt: skip


def test_a_window_that_reuses_what_it_may_raises_nothing() -> None:
    said: list[str] = []
    watch = ReuseWatch(ReuseWatchConfig(window=10), say=said.append)
    for i in range(30):
        watch(record(f"r{i}", 4100, 4000, 4010))  # 100 computed, 90 expected
    assert watch.windows == 3 and watch.alarms == [] and said == []


def test_a_window_that_loses_the_prefix_raises_one_alarm_naming_its_rows() -> None:
    said: list[str] = []
    stops: list[str] = []
    watch = ReuseWatch(ReuseWatchConfig(window=10, stop=True), say=said.append, stop=stops.append)
    recs = [record(f"r{i}", 4100, 4000 if i < 15 else 0, 4010) for i in range(20)]
    for rec in recs:
        watch(rec)
    (alarm,) = watch.alarms
    assert alarm["rows"] == ["r10", "r19"] and alarm["window"] == 2
    assert alarm["uncached_tokens"] == 5 * 100 + 5 * 4100
    assert alarm["expected_uncached_tokens"] == 10 * 90
    assert recs[19].reuse_alarm is alarm  # the results line that closed the window keeps it
    assert len(said) == 1 and "REUSE ALARM: rows r10..r19" in said[0]
    assert stops == said


def test_failed_requests_and_unknown_counts_are_not_judged() -> None:
    watch = ReuseWatch(ReuseWatchConfig(window=5))
    for i in range(10):
        watch(RequestRecord(f"e{i}", "error", prompt_tokens=4100))
        watch(RequestRecord(f"u{i}", "ok", prompt_tokens=4100, cached_tokens=None))
    assert watch.windows == 0


def test_the_engine_prints_the_alarm_within_a_window_of_the_row_and_records_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = items(200)
    spec = JobSpec(results_path=tmp_path / "r.jsonl", progress=False)
    result = asyncio.run(run_job(LosingDouble(), work, spec))
    assert result.error is None and result.ran == 200  # watched, not stopped
    first = result.reuse_alarms[0]
    window = ReuseWatchConfig().window
    # Row K (index K) is in the first window that alarms: rows 50..99.
    ids = [it.custom_id for it in work]
    assert ids.index(first["rows"][0]) <= K <= ids.index(first["rows"][1]) < K + window
    assert "REUSE ALARM" in capsys.readouterr().err
    lines = {line["custom_id"]: line for line in read_results(tmp_path / "r.jsonl")}
    assert lines[first["rows"][1]]["harness"]["reuse_alarm"]["rows"] == first["rows"]


def test_stop_on_cache_miss_stops_with_every_finished_row_kept(tmp_path: Path) -> None:
    work = items(200)
    spec = JobSpec(
        results_path=tmp_path / "r.jsonl", progress=False, reuse=ReuseWatchConfig(stop=True)
    )
    result = asyncio.run(run_job(LosingDouble(), work, spec))
    assert result.error is not None and "reuse alarm" in result.error
    kept = [line["custom_id"] for line in read_results(tmp_path / "r.jsonl")]
    assert len(kept) == result.ran < 200 and len(set(kept)) == len(kept)
    assert kept == [it.custom_id for it in work[: len(kept)]]
    # The same job resumes the rest: every id once.
    again = asyncio.run(run_job(InProcessDouble(), work, dataclasses.replace(spec)))
    assert again.skipped == len(kept)
    final = [line["custom_id"] for line in read_results(tmp_path / "r.jsonl")]
    assert sorted(final) == sorted(it.custom_id for it in work)


def test_a_scale_report_with_an_alarm_fails_its_savings_criteria_naming_it(tmp_path: Path) -> None:
    work = items(120)
    spec = JobSpec(strategy="conversation", policy=TrimPolicy(100_000), progress=False)
    result = asyncio.run(run_job(LosingDouble(k=60), work, spec))
    figures = scale_figures(result, size=120, report_dir=tmp_path)
    assert figures["reuse_alarms"] and figures["token_savings"] > 0.2
    crit = Criterion.parse("token_savings >= 0.2", "s.yaml", "profiles.p.criteria[0]", "scale")
    (checked,) = evaluate([crit], figures)
    assert not checked.passed  # the figure alone would pass
    assert (
        "1 reuse alarm(s) during the run" in checked.message()
        and "REUSE ALARM" in checked.message()
    )


def test_mixed_sources_are_reported_as_mixed() -> None:
    collector = MetricsCollector()
    for i, source in enumerate(("server", "server", "llama.cpp timings")):
        rec = record(f"m{i}", 100, 50, 60)
        rec.cached_source = source
        collector.add(rec)
    m = collector.summary(1.0)
    assert m.cached_source == "mixed"
    assert m.cached_sources == {"server": 2, "llama.cpp timings": 1}


@pytest.mark.integration
def test_harness_run_stop_on_cache_miss_against_a_replay_that_loses_reuse(
    tmp_path: Path, tiny_server: EmbeddedServer
) -> None:
    """A replayed Ollama that reports 0 cached tokens from row K on: `harness run` prints the
    alarm naming rows within a window of K, stops (exit 1), and keeps every finished row."""
    assert tiny_server.url is not None
    real = counting(tiny_server.url)
    seen = [0]

    def counts(body: Any) -> Any:
        out = dict(real(body))
        seen[0] += 1
        if seen[0] > K:  # rows K and after (--ctx is given: no chat before the rows)
            out["prompt_eval_cached_count"] = 0
        return out

    write_candidates_csv(tmp_path / "c.csv", 160, seed=8)
    with OllamaReplay(counts=counts, content='{"score": 5}') as replay:
        args = [sys.executable, "-m", "harness", "run", str(tmp_path / "c.csv"), "--backend",
                "ollama", "--model", "gemma3:12b", "--base-url", replay.url, "--ctx", "8192",
                "--no-progress", "--stop-on-cache-miss"]  # fmt: skip
        done = subprocess.run(args, capture_output=True, text=True, timeout=900,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "REUSE ALARM: rows C000050..C000099" in done.stderr
    assert "stopped on a reuse alarm" in done.stderr + done.stdout
    kept = [line["custom_id"] for line in read_results(tmp_path / "c_results.jsonl")]
    assert 100 <= len(kept) < 160 and len(set(kept)) == len(kept)
    with (tmp_path / "c.csv").open(newline="") as fh:
        ids = [row["id"] for row in csv.DictReader(fh)]
    assert kept == ids[: len(kept)]
