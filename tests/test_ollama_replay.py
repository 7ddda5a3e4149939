"""`harness run` and the suites against a loopback server replaying recorded Ollama bodies.

As a user would run them (`harness run --backend ollama --base-url ...`, `pytest suites/scale
--harness-backend ollama`), against `tests/ollama_replay.py`: every body it sends was recorded
from a real Ollama server (tests/data/ollama/recorded/SOURCES.md); the server version and each
reply's token counts are set per test, because they must describe the request the engine sent.
The engine's own count of each prompt (the packaged Gemma 3 tokenizer, in the tiny model's
server) gives those counts.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from ollama_replay import OllamaReplay, counting

from harness.backends.embedded import EmbeddedServer
from harness.backends.openai import OpenAIBackend
from harness.batch import BatchOptions, load_input
from harness.engine.tokens import TokenCounter
from harness.models.templates import get_format
from harness.workload import write_candidates_csv

pytest_plugins = ["pytester"]
pytestmark = [pytest.mark.integration]
ROOT = Path(__file__).resolve().parent.parent
ROWS = 20
TRUNCATED_ROW = "C000007"
CACHED_SHORT = 40
"""Prompt tokens the replayed server says it computed: the rest of each prompt was cached."""


def engine_counts(csv_path: Path, tiny_server: EmbeddedServer) -> dict[str, int]:
    """The engine's token count of each row's prompt, by the last user message's text."""
    data = load_input(BatchOptions(csv_path, backend="ollama", model="gemma3:12b"))

    async def count() -> dict[str, int]:
        assert tiny_server.url is not None
        async with OpenAIBackend(tiny_server.url, api_key_env=None) as backend:
            counter = TokenCounter(get_format("gemma"), backend.tokenize, source="server")
            out = {}
            for item in data.items:
                out[item.messages[-1]["content"]] = len(await counter.count(list(item.messages)))
            return out

    return asyncio.run(count())


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory, tiny_server: EmbeddedServer) -> Any:
    folder = tmp_path_factory.mktemp("replay")
    csv_path = write_candidates_csv(folder / "c.csv", ROWS, seed=3)
    return csv_path, engine_counts(csv_path, tiny_server)


def fresh(csv_path: Path, name: str) -> Path:
    """The input CSV alone in a folder of its own (no results file to resume from)."""
    folder = csv_path.parent / name
    folder.mkdir()
    return Path(shutil.copy(csv_path, folder / "c.csv"))


def harness_run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "harness", "run", *args, "--no-progress"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def results(path: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["custom_id"]] = rec
    return out


def test_run_reads_cached_tokens_from_the_body_and_fails_a_truncated_row(rows: Any) -> None:
    csv_path, counts = rows
    csv_path = fresh(csv_path, "cached")
    cut = list(counts)[7]  # the user message of row C000007

    def reply_counts(body: Mapping[str, Any]) -> dict[str, Any]:
        text = body["messages"][-1]["content"]
        if text == cut:
            # As ollama#9221's log: the prompt was cut to a 2,048-token limit.
            return {"prompt_eval_count": 2048, "prompt_eval_cached_count": 0}
        n = counts[text]
        return {"prompt_eval_count": n, "prompt_eval_cached_count": n - CACHED_SHORT}

    with OllamaReplay(version="0.34.0", counts=reply_counts) as replay:
        done = harness_run(
            str(csv_path), "--backend", "ollama", "--base-url", replay.url,
            "--model", "gemma3:12b", "--structured", "none", cwd=csv_path.parent,
        )  # fmt: skip
        chats = replay.chats()
    assert done.returncode == 1, done.stderr  # one row failed
    assert len(chats) == ROWS
    assert all(body["truncate"] is False for body in chats)
    # The banner came before any request: the context it read from /api/ps, and the prompt.
    assert "harness run: context: 16384 tokens per request (ollama:/api/ps context_length)" in (
        done.stderr
    )
    assert "harness run: prompt: recruiter" in done.stderr
    lines = results(csv_path.with_name("c_results.jsonl"))
    assert len(lines) == ROWS
    failed = [rec for rec in lines.values() if rec["error"] is not None]
    assert [rec["custom_id"] for rec in failed] == [TRUNCATED_ROW]
    assert (
        "the prompt was truncated: the server counted 2048 prompt tokens"
        in (failed[0]["error"]["message"])
    )
    for cid, rec in lines.items():
        if cid == TRUNCATED_ROW:
            continue
        h = rec["harness"]
        assert h["cached_source"] == "server"
        assert h["cached_tokens"] == h["prompt_tokens"] - CACHED_SHORT
        assert h["prompt_tokens"] == h["expected_prompt_tokens"]
    assert "source: server" in done.stdout


def test_replayed_as_0_30_0_new_token_counts_are_not_taken_for_truncation(rows: Any) -> None:
    folder = fresh(rows[0], "v030").parent
    with OllamaReplay(
        version="0.30.0",
        chat="chat_qwen2.5vl_3b_nonstream_turn1.json",  # recorded without a cached field
        counts=lambda body: {"prompt_eval_count": CACHED_SHORT},  # new tokens only in 0.30.0
    ) as replay:
        done = harness_run(
            "c.csv", "--backend", "ollama", "--base-url", replay.url, "--structured", "none",
            cwd=folder,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = results(folder / "c_results.jsonl")
    assert all(rec["error"] is None for rec in lines.values())
    assert {rec["harness"]["cached_source"] for rec in lines.values()} == {"unknown"}
    assert "token savings unknown" in done.stdout


def test_a_plain_404_page_is_one_line_naming_the_url_without_ollama_pull(rows: Any) -> None:
    csv_path = fresh(rows[0], "404")
    with OllamaReplay() as replay:
        done = harness_run(
            str(csv_path), "--backend", "ollama", "--base-url", replay.url + "/v1",
            cwd=csv_path.parent,
        )  # fmt: skip
    assert done.returncode == 1
    errors = [ln for ln in done.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1, done.stderr
    assert f"no Ollama API at {replay.url}/v1" in errors[0]
    assert "ollama pull" not in done.stderr


def test_a_loaded_context_too_small_for_the_rubric_refuses_to_start(rows: Any) -> None:
    csv_path = fresh(rows[0], "small")
    with OllamaReplay(context_length=2048) as replay:  # ollama#9221's server had 2,048
        done = harness_run(
            str(csv_path), "--backend", "ollama", "--base-url", replay.url, cwd=csv_path.parent
        )
        chats = replay.chats()
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "one request's context is 2048 (ollama:/api/ps context_length)" in last
    assert "OLLAMA_CONTEXT_LENGTH" in last and "num_ctx" in last
    assert chats == []  # nothing was sent


# -- the suites' production profile against the replay ------------------------------------------

FAKE_NVML = """\
import harness.memory
from types import SimpleNamespace

class FakeNvml:
    def nvmlInit(self): pass
    def nvmlDeviceGetCount(self): return 1
    def nvmlDeviceGetHandleByIndex(self, i): return ("gpu", i)
    def nvmlDeviceGetName(self, h): return "NVIDIA GeForce RTX 4080 (fake)"
    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=11_800_000_000, total=16 * 1024**3, free=1)
    def nvmlDeviceGetComputeRunningProcesses(self, h): return []
    def nvmlDeviceGetPowerUsage(self, h): return 250_000
    def nvmlDeviceGetTotalEnergyConsumption(self, h): return 1_000_000

harness.memory.load_nvml = lambda: FakeNvml()
"""


SCALE_100 = "performance_benchmarks_100.gpu-gemma3-12b.gemma3-12b.json"


def suite_project(pytester: pytest.Pytester) -> None:
    shutil.copytree(ROOT / "scenarios", pytester.path / "scenarios")
    shutil.copytree(ROOT / "suites", pytester.path / "suites")


def test_gpu_profile_savings_not_reported_fail_with_the_reason(pytester: pytest.Pytester) -> None:
    suite_project(pytester)
    with OllamaReplay(
        version="0.30.0",
        chat="chat_qwen2.5vl_3b_nonstream_turn1.json",
        counts=lambda body: {"prompt_eval_count": CACHED_SHORT},
    ) as replay:
        result = pytester.runpytest_subprocess(
            "suites/scale", "-m", "scale_100", "--harness-backend", "ollama",
            "--harness-base-url", replay.url, "-p", "no:cacheprovider",
        )  # fmt: skip
    result.assert_outcomes(failed=1, deselected=4)
    result.stdout.fnmatch_lines(
        [
            "*token_savings = unknown (cached prompt tokens not reported by ollama 0.30.0*"
            "needs > 0.9 (scenarios/phase2_scale_100.yaml, profile gpu-gemma3-12b)*",
            "*cached_tokens_source = unknown, needs == server*",
        ]
    )
    report = json.loads((pytester.path / "reports" / SCALE_100).read_text())
    assert report["profile"] == "gpu-gemma3-12b"
    assert report["passed"] is False
    assert report["token_savings"] is None
    assert report["completed"] == 100  # 0.30.0's new-token counts were not taken for cuts


def test_gpu_profile_spill_fails_the_memory_criterion_read_from_nvml(
    pytester: pytest.Pytester,
) -> None:
    suite_project(pytester)
    pytester.makeconftest(FAKE_NVML)
    with OllamaReplay(
        version="0.34.0",
        spilled=True,
        counts=lambda body: {"prompt_eval_count": None, "prompt_eval_cached_count": None},
    ) as replay:
        result = pytester.runpytest_subprocess(
            "suites/scale", "-m", "scale_100", "--harness-backend", "ollama",
            "--harness-base-url", replay.url, "-p", "no:cacheprovider",
        )  # fmt: skip
    result.assert_outcomes(failed=1, deselected=4)
    result.stdout.fnmatch_lines(["*memory.spilled = True, needs == 0*"])
    report = json.loads((pytester.path / "reports" / SCALE_100).read_text())
    memory = report["memory"]
    assert memory["source"] == "nvml:gpu0"
    assert memory["spilled"] is True
    assert memory["peak_gb"] == pytest.approx(11.8)
    assert memory["server_source"] == "ollama:/api/ps gemma3:12b"
    assert report["energy_source"].startswith("nvml:gpu0 (NVIDIA GeForce RTX 4080 (fake))")


def test_replies_that_leave_the_cached_count_out_fail_savings_with_the_coverage(
    pytester: pytest.Pytester,
) -> None:
    """One reply in five without `prompt_eval_cached_count`, from a server that sent it before:
    counted as 0 (it leaves a zero out), never dropped from the ratio where savings would read
    high; the savings criterion fails and says how the counts were taken."""
    suite_project(pytester)
    chats = [0]

    def counts(body: Any) -> dict[str, Any]:
        chats[0] += 1
        omit = chats[0] % 5 == 0
        return {"prompt_eval_count": 100_000, "prompt_eval_cached_count": None if omit else 99_960}

    with OllamaReplay(version="0.34.0", counts=counts) as replay:
        result = pytester.runpytest_subprocess(
            "suites/scale", "-m", "scale_100", "--harness-backend", "ollama",
            "--harness-base-url", replay.url, "-p", "no:cacheprovider",
        )  # fmt: skip
    result.assert_outcomes(failed=1, deselected=4)
    result.stdout.fnmatch_lines(
        [
            "*token_savings = 0.8*, needs > 0.9 (scenarios/phase2_scale_100.yaml, profile "
            "gpu-gemma3-12b); cached tokens known for 100 of 100 completed requests (coverage "
            "1.00): 80 reported, 20 left out by a server that sent the field before (counted "
            "as 0)*"
        ]
    )
    report = json.loads((pytester.path / "reports" / SCALE_100).read_text())
    assert report["cached_omitted"] == 20 and report["cached_coverage"] == 1.0
    assert report["token_savings"] == pytest.approx(80 * 99_960 / 10_000_000)
    # The replay says what it is, in every report it feeds.
    assert report["backend"]["replay"].startswith("tests/ollama_replay.py")


def test_run_in_logprobs_mode_scores_every_row_from_the_replayed_logprobs(
    rows: Any, tiny_server: EmbeddedServer
) -> None:
    """`--score-mode logprobs` against Ollama: each row is a raw `/api/generate` whose prompt
    ends in the reply's start, asking `top_logprobs`; the derived bodies (SOURCES.md: their
    shape from Ollama's source, their numbers placeholders) give every row its score, expected
    score and probability in the scores CSV."""
    csv_path, _ = rows
    csv_path = fresh(csv_path, "logprobs")
    assert tiny_server.url is not None
    with OllamaReplay(version="0.34.0", counts=counting(tiny_server.url, new_tokens=120)) as replay:
        done = harness_run(
            str(csv_path), "--backend", "ollama", "--base-url", replay.url,
            "--model", "gemma3:12b", "--score-mode", "logprobs", cwd=csv_path.parent,
        )  # fmt: skip
        generates, chats = replay.generates, replay.chats()
    assert done.returncode == 0, done.stderr
    assert "harness run: score mode: logprobs (command line)" in done.stderr
    assert not chats  # no row was decoded
    # Two prompts a row: the value's first token, then the token after `1` (10 is `1`, `0`).
    assert len(generates) == 2 * ROWS
    for body in generates:
        assert body["raw"] is True and body["truncate"] is False
        assert body["logprobs"] is True and body["top_logprobs"] == 20
        assert body["options"]["num_predict"] == 1
        assert body["prompt"].endswith('<start_of_turn>model\n{"score": ') or body[
            "prompt"
        ].endswith('{"score": 1')
    with open(csv_path.with_name("c_scores.csv"), newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == ROWS
    # From the derived bodies: after `{"score": ` 7 is the most probable digit (e^-0.4 of the
    # listed mass over 1..9), so the score is 7; 10 takes 1's share times e^-0.2 / (e^-0.2 +
    # e^-1.8) after `1`.
    top = [("7", -0.4), ("6", -1.6), ("8", -2.6), ("5", -4.1), ("9", -5.0), ("1", -5.6),
           ("4", -6.2), ("3", -7.5), ("2", -8.3)]  # fmt: skip
    z = sum(math.exp(lp) for _, lp in top)
    p = {int(t): math.exp(lp) / z for t, lp in top}
    ten = p[1] * math.exp(-0.2) / (math.exp(-0.2) + math.exp(-1.8))
    p[10], p[1] = ten, p[1] - ten
    expected = sum(v * pv for v, pv in p.items())
    for row in table:
        assert row["status"] == "ok", row
        assert row["score"] == "7"
        assert float(row["score_p"]) == pytest.approx(p[7], abs=1e-6)
        assert float(row["score_expected"]) == pytest.approx(expected, abs=1e-6)
    line = next(iter(results(csv_path.with_name("c_results.jsonl")).values()))
    scoring = line["harness"]["scoring"]
    assert scoring["mode"] == "logprobs" and scoring["argmax"] == 7
    # The chat.completion body carries them as OpenAI's logprobs.content; the server's own
    # body beside it.
    choice = line["response"]["body"]["choices"][0]
    assert choice["logprobs"]["content"][0]["top_logprobs"][0]["token"] == "7"
    assert line["harness"]["server_reply"]["logprobs"][0]["top_logprobs"][0]["token"] == "7"


NOT_HERE = """\
import harness.memory

# The replay listens on 127.0.0.1; this session takes it for a server on another machine.
harness.memory.is_loopback_url = lambda url: False
"""


def test_phase_1_on_a_server_elsewhere_needs_a_memory_budget(pytester: pytest.Pytester) -> None:
    """This machine's RAM or GPU says nothing of a remote server's: phase 1 refuses to budget
    against them (a usage error, which `harness validate` turns into exit 2) and names the
    option."""
    suite_project(pytester)
    pytester.makeconftest(NOT_HERE)
    with OllamaReplay(version="0.34.0", kv_bytes_per_token=160_000) as replay:
        result = pytester.runpytest_subprocess(
            "suites/context_limits", "-m", "context_limits", "--harness-backend", "ollama",
            "--harness-base-url", replay.url, "-p", "no:cacheprovider",
        )  # fmt: skip
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "is not on this machine" in result.stdout.str() + result.stderr.str()
    assert "--harness-memory-budget" in result.stdout.str() + result.stderr.str()


def about_4_chars_a_token(body: Any) -> dict[str, Any]:
    """Token counts for a replayed reply that describe the request (about 4 characters a token,
    all but the last 40 cached): a model of a server's count, set by the test."""
    text = body.get("prompt") or "".join(m.get("content", "") for m in body["messages"])
    n = max(50, len(text) // 4)
    return {"prompt_eval_count": n, "prompt_eval_cached_count": n - 40}


def test_harness_validate_on_the_replayed_ollama_runs_the_job_and_names_the_replay(
    tmp_path: Path,
) -> None:
    """`harness validate INPUT --backend ollama` against the replay: phase 1 writes its line to
    the config (the scale phase then compares memory with it), every report names the input and
    the verdict names the replay. Two phases here (~30 s); all six ran in 2 m 43 s by hand."""
    from test_job_rows import make_job

    from harness.config import find_job, load_profile
    from harness.validate import ValidateOptions, validate

    cands, rubric = make_job(tmp_path, rows=30)

    said: list[str] = []
    with OllamaReplay(
        counts=about_4_chars_a_token, content='{"score": 7}', kv_bytes_per_token=4096
    ) as replay:
        opts = ValidateOptions(
            input=cands, prompt=rubric, id_column="candidate_id", backend="ollama",
            base_url=replay.url, report_dir=tmp_path / "reports",
            config=tmp_path / "harness.yaml", phases=("context_limits", "scale_100"),
        )  # fmt: skip
        validate(opts, root=ROOT, say=said.append)
    text = "\n".join(said)
    assert "context limits: PASS" in text, text
    profile = load_profile(tmp_path / "harness.yaml", "gpu-gemma3-12b")
    assert profile.get("MODEL_VRAM_GB") is not None and profile.get("KV_CACHE_PER_TOKEN_MB")
    (scale,) = (tmp_path / "reports").glob("performance_benchmarks_100.*")
    report = json.loads(scale.read_text())
    assert report["job"]["input"].endswith("cands.csv") and report["job"]["rows"] == "your input"
    assert report["memory"]["predicted_ratio_error"] is not None  # phase 1's line was read
    assert "verdict: NO-GO" in text and "a replayed server (tests/ollama_replay.py" in text
    record = find_job(tmp_path / "harness.yaml", cands)
    assert record is not None and record.backend == "ollama"


def test_the_performance_suite_on_ollama_measures_requests_in_flight(
    pytester: pytest.Pytester,
) -> None:
    """Against Ollama the suite does not skip: the slots are the server's, and the requests in
    flight against them are measured, gated (no errors) and named in the report; on the replay
    its figures are a replay's, never a measurement (the verdict says so)."""
    suite_project(pytester)
    with OllamaReplay(counts=about_4_chars_a_token, content='{"score": 7}') as replay:
        result = pytester.runpytest_subprocess(
            "suites/performance", "-k", "test_performance", "--harness-backend", "ollama",
            "--harness-base-url", replay.url, "-p", "no:cacheprovider",
            "--harness-write-config",
        )  # fmt: skip
    result.assert_outcomes(passed=1)
    said = result.stdout.str() + result.stderr.str()
    assert "requests in flight against the server's slots: 1: " in said
    (path,) = (pytester.path / "reports").glob("concurrency_results.gpu-gemma3-12b.*.json")
    report = json.loads(path.read_text())
    cells = report["server_concurrency"]
    assert [c["concurrency"] for c in cells] == [1, 2, 4]
    assert all(len(c["rounds"]) == 3 and c["errors"] == 0 for c in cells)
    assert [(c["metric"], c["value"], c["passed"]) for c in report["criteria"]] == [
        ("errors", 0, True)
    ]
    best = report["recommended"]["CONCURRENCY"]
    assert f"CONCURRENCY {best}" in said and best in (1, 2, 4)
    assert f"CONCURRENCY: {best}" in (pytester.path / "harness.yaml").read_text()
    assert "replay" in json.dumps(report["backend"]).lower()
