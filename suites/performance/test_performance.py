"""Performance: the request paths side by side, the real limit, and the settings they pick.

    pytest suites/performance -k test_performance   # gemma3-270m on the CPU, ~11 min on 2 cores
    pytest suites/performance -k test_performance --harness-backend ollama   # requests in flight

Against Ollama the request paths and slots are the server's (OLLAMA_NUM_PARALLEL): the suite
measures what the client sets, requests in flight (`concurrency`), round by round on rows new to
the server, and writes the fastest back (CONCURRENCY).

On one server, round by round (harness.phases.performance_runs): the engine on the token path, the
chat path and the text path (Ollama's form), a minimal direct client (chat bodies), the
conversation strategy, and a naive client with the prefix cache off. Every ratio is computed per
round and reported as median and spread. Then the same items, scored as production scores them
(the rubric's output schema under a grammar), on the token, text and chat paths: on the token
path the replies must be those of the text path (Ollama's form, the same `/completion`), the same
text and scores; the chat path's are reported beside them (llama-server runs another chat parser
there, `peg-native`, and near-ties can fall the other way). The limit: prefill by chunk size
after the rubric and decode (llama-bench's pp/tg at depth), calibrated in every round beside the
variants, single-stream and batched across slots; efficiency against the single-stream bound
and against the best of the two (per rate, whichever is faster on this machine). Then client
concurrency × slots × path, and the trim interval, measured; the best go to harness.yaml with
`--harness-write-config` (after the gate).

The score modes: in every round the rubric's scored items on the token path, decoded (the reply
written under the tight grammar) and in `logprobs` mode (the reply's JSON sent written up to the
score, the score read from the top log-probabilities: `harness.scoring`), side by side; each
against its own bound (prefill of the uncached tokens plus the forward steps the mode needs: the
decoded tokens, or one per probe token, 1 for 1..10 on Gemma). Then the same rows in both modes:
SCORE_MODE goes to harness.yaml as `logprobs` only where its scores equal the decoded ones on at
least 98% of them and it is faster.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from harness.backends.base import Backend
from harness.engine import JobSpec
from harness.phases import items_for, prompt_for
from harness.phases import performance_runs as runs
from harness.phases.common import phase1_budget
from harness.pytest import HarnessSession
from harness.run.preflight import spec_for
from harness.run.settings import RunConfig
from harness.scenarios import Scenario

SCENARIO = "performance.yaml"
pytestmark = [pytest.mark.performance, pytest.mark.integration, pytest.mark.timeout(7200)]
T = TypeVar("T")


class SessionServers:
    """The phase's servers from the session (`runs.Servers`): started for the scenario's
    settings, each one's job built by `spec_for` (capped to that server)."""

    def __init__(self, harness: HarnessSession, scenario: Scenario) -> None:
        self.harness, self.scenario = harness, scenario
        self.configs: dict[int, tuple[Backend, RunConfig]] = {}

    def config(self, *, parallel: int, concurrency: int, request_path: str) -> RunConfig:
        return self.harness.run_config(
            self.scenario, parallel=parallel, concurrency=concurrency, request_path=request_path
        )

    def start(self, *, parallel: int, concurrency: int, request_path: str) -> Backend:
        cfg = self.config(parallel=parallel, concurrency=concurrency, request_path=request_path)
        backend = self.harness.backend(cfg)
        self.configs[id(backend)] = (backend, cfg)
        return backend

    def job(self, backend: Backend) -> JobSpec:
        _, cfg = self.configs[id(backend)]
        return spec_for(cfg, backend, results=None, desc="performance", progress=False)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.harness.run(coro)

    def release(self, backend: Backend) -> None:
        self.configs.pop(id(backend), None)
        self.harness.release(backend)


def test_performance(harness: HarnessSession) -> None:
    scenario = harness.scenario(SCENARIO)
    opts: dict[str, Any] = scenario.profile(harness.profile).options
    servers = SessionServers(harness, scenario)
    if servers.config(parallel=1, concurrency=1, request_path="tokens").backend.value != "embedded":
        on_a_server_it_does_not_start(harness, scenario, opts)
        return
    backend = servers.start(parallel=1, concurrency=1, request_path="tokens")
    # The batched bound's server (the sweep's most slots, token path), calibrated in every round
    # beside the single-stream roofline; the sweep reuses it.
    top = max(int(s) for s in opts.get("slots", [1, 2]))
    batched = (
        servers.start(parallel=top, concurrency=top, request_path="tokens") if top > 1 else None
    )
    rounds, n = int(opts.get("rounds", 5)), int(opts.get("requests", 10))
    agree_n = int(opts.get("agreement_items", 100))
    pool = items_for(scenario, harness.profile, n * rounds * len(runs.VARIANTS) + 300 + agree_n)
    prompt = prompt_for(scenario, harness.profile)
    figures = harness.run(
        runs.measure(backend, batched, pool, prompt, rounds, n, opts,
                     job=servers.job(backend), plots_dir=harness.report_dir / "plots")
    )  # fmt: skip
    figures["plots"] = [harness.relpath(p) for p in figures["plots"]]
    servers.release(backend)
    figures.update(runs.sweeps(servers, pool[-250:], opts))
    mode, why = runs.conclude(figures, max_slots=max_slots(harness, scenario))
    report = harness.report("performance_comparison.json", scenario, figures, backend=backend)
    harness.say(
        "performance: "
        + ", ".join(f"{k} {figures[k]:.3f}" for k in runs.RATIOS)
        + "; tokens over chat with all the chat path's overhead gone, its compute unchanged: "
        + f"{figures['tokens_over_chat_ceiling'] or 0:.3f}"
        + f"; score modes: logprobs ÷ decode {figures['logprobs_over_decode']:.3f}, the same "
        + f"score on {figures['score_agreement'] or 0:.1%} of {figures['score_agreement_rows']} "
        + f"rows: SCORE_MODE {mode} ({why})"
    )
    harness.gate(report)
    harness.recommend(figures["recommended"], report, backend)


def on_a_server_it_does_not_start(
    harness: HarnessSession, scenario: Scenario, opts: dict[str, Any]
) -> None:
    """Ollama: the request paths and the slots are the server's (OLLAMA_NUM_PARALLEL, set where
    it starts); what the client sets, requests in flight, is measured against them and the
    fastest written back (CONCURRENCY, with --harness-write-config)."""
    concs = {int(c) for c in opts.get("concurrency", [1, 2, 4])}
    cfg = harness.run_config(scenario, concurrency=max(concs))
    backend = harness.backend(cfg)
    need = 1 + int(opts.get("sweep_rounds", 3)) * len(concs) * int(opts.get("sweep_requests", 8))
    job = spec_for(cfg, backend, results=None, desc="performance", progress=False)
    cells = harness.run(
        runs.concurrency_cells(backend, items_for(scenario, harness.profile, need), job, opts)
    )
    best = runs.pick_concurrency(cells)
    figures = {
        "server_concurrency": cells,
        "errors": sum(int(c["errors"]) for c in cells),
        "slots": "the server's own (OLLAMA_NUM_PARALLEL where Ollama starts; no API shows it)",
        "recommended": {"CONCURRENCY": best},
    }
    report = harness.report("concurrency_results.json", scenario, figures, backend=backend)
    harness.say(
        "performance: requests in flight against the server's slots: "
        + ", ".join(f"{c['concurrency']}: {c['throughput_rps']:.3f} req/s" for c in cells)
        + f"; CONCURRENCY {best}"
    )
    harness.gate(report)
    harness.recommend(figures["recommended"], report, backend)


def max_slots(harness: HarnessSession, scenario: Any) -> int | None:
    """The most slots whose predicted memory (phase 1's line: base + KV per token × n_ctx ×
    slots) fits phase 1's budget; None when phase 1 has not run for this profile."""
    budget = phase1_budget(harness.report_dir, harness.profile)
    cfg = harness.run_config(scenario)
    if budget is None or cfg.model_memory_gb is None or cfg.kv_mb_per_token is None:
        return None
    per_slot_gb = cfg.kv_mb_per_token * cfg.n_ctx.value / 1000.0
    room = budget[0] / 1e9 - cfg.model_memory_gb
    return max(1, int(room // per_slot_gb)) if per_slot_gb > 0 else None
