"""The phases' logic (harness.phases) on the in-process double and on hand-made records."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from harness.engine import JobSpec, RunnerConfig, TrimPolicy, run_job
from harness.limits import LimitSearch, Measurement, MemoryFit
from harness.models import geometry_from_metadata
from harness.phases import context_shape, recommended_trim_interval
from harness.phases import quality as q
from harness.phases.context_limits import limits_figures, recommended_config, theory_or_none
from harness.records import RequestRecord
from harness.scenarios import evaluate, load_scenario
from harness.testing import InProcessDouble
from harness.testing.doubles import char_tokenize
from harness.workload import WorkItem, generate_candidates, load_prompt

SCHEMA = {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}


def rec(cid: str, value: int | None, *, ok: bool = True) -> RequestRecord:
    parsed = {"score": value} if value is not None else None
    return RequestRecord(cid, "ok" if ok else "error", parsed=parsed)


def items(n: int, prefix: str = "c") -> list[WorkItem]:
    system = {"role": "system", "content": "Score it."}
    return [
        WorkItem(
            f"{prefix}{i}",
            (system, {"role": "user", "content": f"candidate {i}"}),
            max_tokens=4,
            output_schema=SCHEMA,
        )
        for i in range(n)
    ]


# -- quality ------------------------------------------------------------------------------------


def test_unparseable_replies_are_never_reproducible() -> None:
    # The bug this guards: None == None counted two unparseable replies as the same score.
    assert q.reproducibility([None, None, 3], [None, None, 3]) == pytest.approx(1 / 3)
    assert q.reproducibility([None] * 4, [None] * 4) == 0.0
    assert q.consistency([None, None, None]) == 0.0
    assert q.consistency([7, 7, None, 7]) == 0.75


def test_score_reads_only_parsed_integers_of_successful_records() -> None:
    assert q.score(rec("a", 5)) == 5
    assert q.score(rec("a", None)) is None
    assert q.score(rec("a", 5, ok=False)) is None
    assert q.score(RequestRecord("a", "ok", parsed={"score": True})) is None  # bool is no score


def test_drift_is_the_largest_change_of_any_control_and_unknown_when_one_did_not_parse() -> None:
    assert q.drift({"x": [3, 3, 3], "y": [5, 6, 5]}) == 1
    assert q.drift({"x": [3, 3, 3]}) == 0
    assert q.drift({"x": [3, None, 3]}) is None


def test_accuracy_against_the_probe_rule() -> None:
    rows = {
        "c0": {"data_infra_years": "0"},
        "c1": {"data_infra_years": "7"},
        "c2": {"data_infra_years": "14"},
    }
    expected = q.probe_expected(rows)
    its = items(3)
    assert [expected(it) for it in its] == [1, 7, 10]
    assert q.accuracy(its, [rec("c0", 1), rec("c1", 7), rec("c2", 1)], expected) == pytest.approx(
        2 / 3
    )
    # A model that gives everyone 1 (SmolLM2 did, for 45 of 50) is not accurate.
    assert q.accuracy(its, [rec(f"c{i}", 1) for i in range(3)], expected) == pytest.approx(1 / 3)


def test_bias_pairs_vary_only_what_the_prompt_declares_irrelevant() -> None:
    root = Path(__file__).resolve().parent.parent / "scenarios" / "prompts"
    # The rubric scores education and location (evidence, the time-zone requirement): names only.
    fields, source = q.bias_fields(load_prompt(root / "recruiter.yaml"))
    assert fields == ("name",) and "irrelevant_fields of" in source
    # The probe reads data_infra_years alone.
    assert q.bias_fields(load_prompt(root / "quality_probe.yaml"))[0] == (
        "name", "location", "education",
    )  # fmt: skip
    varied: list[str] = []

    def variant(item: WorkItem, field: str) -> WorkItem:
        varied.append(field)
        turn = {"role": "user", "content": f"{field} changed"}
        return replace(item, custom_id=f"{item.custom_id}-b", messages=(turn,))

    plan = q.plan_quality(
        items(12), repeats=1, candidates=4, conversation_length=5, controls=1,
        variant=variant, bias_pairs=2, fields=("name",),
    )  # fmt: skip
    assert set(plan.bias) == {"name"} and set(varied) == {"name"}
    assert len(plan.bias["name"]) == 2 and plan.bias_unpaired == {}


def test_a_field_with_no_bias_pair_says_why() -> None:
    """The user's CSV had no `name` column and the prompt declared no irrelevant_fields: the
    report said `bias_gaps: {name: null}` and not why."""

    def plan(variant: Any, columns: tuple[str, ...] | None) -> q.QualityPlan:
        return q.plan_quality(
            items(12), repeats=1, candidates=4, conversation_length=5, controls=1,
            variant=variant, bias_pairs=2, fields=("name",), columns=columns,
        )  # fmt: skip

    missing = plan(lambda item, field: None, ("candidate_id", "resume_text", "years"))
    assert missing.bias == {"name": []}
    assert (
        "'name' is not a column of the input (candidate_id, resume_text, years)"
        in (missing.bias_unpaired["name"])
    )
    assert "irrelevant_fields" in missing.bias_unpaired["name"]
    # A column the prompt does not show: the copy is the same request, no pair.
    unseen = plan(lambda item, field: replace(item, custom_id="x"), ("name",))
    assert unseen.bias == {"name": []}
    assert "the prompt does not show 'name'" in unseen.bias_unpaired["name"]
    same = plan(lambda item, field: None, ("name",))
    assert same.bias_unpaired == {"name": "no two rows of the input differ in 'name'"}


def test_bias_gaps_per_field() -> None:
    gaps = q.bias_gaps({"name": [(5, 5), (3, 4)], "location": [(None, 4)], "education": []})
    assert gaps == {"name": 0.5, "location": None, "education": None}


def test_plan_places_controls_at_start_quarters_and_end() -> None:
    pool = items(30)
    plan = q.plan_quality(pool, repeats=4, candidates=10, conversation_length=20, controls=2)
    assert [it.custom_id for it in plan.repeats] == [f"c0#repeat{i}" for i in range(4)]
    assert len(plan.candidates) == 10
    assert len(plan.conversation) == 20
    assert plan.control_positions == {"c0": [0, 5, 10, 15, 19], "c11": [1, 6, 11, 16, 18]}
    ids = [it.custom_id for it in plan.conversation]
    assert len(set(ids)) == len(ids)  # every request of the conversation has its own id
    assert ids[0] == "c0#pos0" and ids[5] == "c0#pos5"


def test_quality_figures_on_the_double() -> None:
    """The whole phase's arithmetic on the in-process double (its scores hash the candidate)."""
    pool = items(25)
    plan = q.plan_quality(pool, repeats=3, candidates=8, conversation_length=12, controls=2)
    backend = InProcessDouble()

    def run(its: Sequence[WorkItem], strategy: str) -> list[RequestRecord]:
        spec = JobSpec(
            strategy=strategy, policy=TrimPolicy(100_000), progress=False, keep_records=True
        )
        return asyncio.run(run_job(backend, list(its), spec)).records

    runs = q.QualityRuns(
        repeats=run(plan.repeats, "stateless"),
        run_a=run(plan.candidates, "stateless"),
        run_b=run(plan.candidates, "stateless"),
        conversation=run(plan.conversation, "conversation"),
        bias=[],
    )
    figures = q.quality_figures(plan, runs, expected=None)
    assert figures["consistency_rate"] == 1.0
    assert figures["reproducible_rate"] == 1.0
    assert figures["score_files_identical"] is True
    assert figures["drift_spread"] == 0  # the double scores the last message: no drift
    assert figures["parse_rate"] == 1.0
    assert figures["accuracy"] is None
    # 2 controls need room for 5 places each: the conversation is 15 long, not 12.
    assert figures["requests"] == 3 + 8 + 8 + len(plan.conversation)
    assert len(plan.conversation) == 15


def test_a_run_whose_replies_never_parse_scores_zero() -> None:
    plan = q.plan_quality(items(12), repeats=3, candidates=5, conversation_length=6, controls=1)
    garbage = InProcessDouble(reply=lambda request: "not json at all")

    def run(its: Sequence[WorkItem]) -> list[RequestRecord]:
        spec = JobSpec(policy=TrimPolicy(100_000), progress=False, keep_records=True)
        return asyncio.run(run_job(garbage, list(its), spec)).records

    runs = q.QualityRuns(
        run(plan.repeats), run(plan.candidates), run(plan.candidates), run(plan.conversation), []
    )
    figures = q.quality_figures(plan, runs, expected=None)
    assert figures["reproducible_rate"] == 0.0
    # Two score files of empty cells are two failures, not identical files.
    assert figures["score_files_identical"] is False
    assert figures["consistency_rate"] == 0.0
    assert figures["parse_rate"] == 0.0
    assert figures["drift_spread"] is None
    assert figures["flips_not_near_tie"] == 5  # unparsed: never shown to be a near-tie
    # And the shipped quality gate fails it on every profile, on reproducibility among others
    # (the stand-in's profile gates the flips not shown to be near-ties instead of every flip).
    scenario = load_scenario(Path(__file__).resolve().parent.parent / "scenarios/quality.yaml")
    for profile in scenario.profiles:
        results = evaluate(scenario.criteria_for(profile), figures)
        failed = {r.criterion.metric for r in results if not r.passed}
        assert {"consistency_rate", "parse_rate"} <= failed, profile
        assert {"reproducible_rate", "flips_not_near_tie"} & failed, profile


# -- context limits -----------------------------------------------------------------------------


GEMMA3_META = {
    "general.architecture": "gemma3",
    "gemma3.block_count": 18,
    "gemma3.attention.head_count": 4,
    "gemma3.attention.head_count_kv": 1,
    "gemma3.attention.key_length": 256,
    "gemma3.attention.value_length": 256,
    "gemma3.embedding_length": 640,
    "gemma3.attention.sliding_window": 512,
    "gemma3.context_length": 32768,
}


def test_limits_figures_and_the_config_they_recommend() -> None:
    geom = geometry_from_metadata(GEMMA3_META, source="t")
    theory, note = theory_or_none(geom)
    assert theory is not None and theory.bytes_per_token_growing == 3072
    measured = [
        Measurement(4096, 300_000_000 + 3072 * 4096, "rss:pid=1"),
        Measurement(8192, 300_000_000 + 3072 * 8192, "rss:pid=2"),
    ]
    fit = MemoryFit(slope=3072.0, intercept=300_000_000.0, r_squared=1.0)
    search = LimitSearch(32768, "trained context", None, [], [])
    rec_cfg = recommended_config(max_ctx=32768, fit=fit, parallel=1, server_flags="ollama")
    assert "TRIM_INTERVAL" not in rec_cfg  # the performance phase's, measured
    assert rec_cfg["CONTEXT_TRIM_THRESHOLD"] == int(32768 * 0.8)
    assert rec_cfg["SERVER_FLAGS"] == "ollama"
    figures = limits_figures(
        model="m",
        geom=geom,
        theory=theory,
        theory_note=note,
        measured=measured,
        skipped=[],
        fit=fit,
        search=search,
        budget=10**9,
        budget_source="t",
        tokens={},
        recommended=rec_cfg,
    )
    assert figures["kv_theory_ratio"] == 1.0
    assert figures["within_budget"] is True
    assert figures["kv_bytes_per_token_source"] == "rss:pid=1"


def test_an_architecture_without_theory_gives_an_unknown_ratio() -> None:
    meta = {k.replace("gemma3.", "gemma3n."): v for k, v in GEMMA3_META.items()}
    meta["general.architecture"] = "gemma3n"
    theory, note = theory_or_none(geometry_from_metadata(meta, source="t"))
    assert theory is None and "does not model" in note


def test_trim_interval_from_the_workload_shape() -> None:
    prompt = load_prompt()
    system = {"role": "system", "content": prompt.system}
    its = [
        WorkItem(
            row["id"], (system, {"role": "user", "content": prompt.render(row, "id")}), max_tokens=8
        )
        for row in generate_candidates(10)
    ]
    backend = InProcessDouble()

    async def shape() -> dict[str, float]:
        from harness.engine.tokens import TokenCounter

        counter = TokenCounter(backend.chat_format, backend.tokenize, source="double")
        return await context_shape(counter, its)

    s = asyncio.run(shape())
    assert s["prefix_tokens"] > 500
    interval = recommended_trim_interval(8000, s)
    assert interval >= 1
    # The interval's exchanges fit between the prefix and the threshold.
    assert s["prefix_tokens"] + interval * s["tokens_per_exchange"] <= 8000


# -- the scale report's memory figures -----------------------------------------------------------


def _scale_result(memory: dict[str, object]) -> object:
    result = asyncio.run(run_job(InProcessDouble(), items(20), JobSpec(progress=False)))
    result.memory = {"server": memory}
    return result


GPU_MEMORY = (
    "memory.spilled == 0",
    "memory.failed_readings_rate <= 0.01",
    "memory.predicted_ratio_error <= 0.2",
)


def _check(figures: dict[str, object]) -> dict[str, str]:
    from harness.scenarios import Criterion

    crit = [Criterion.parse(t, "s.yaml", f"profiles.p.criteria[{i}]", "scale")
            for i, t in enumerate(GPU_MEMORY)]  # fmt: skip
    return {r.criterion.metric: r.message() for r in evaluate(crit, figures) if not r.passed}


def test_memory_never_read_fails_spill_and_failed_readings(tmp_path: Path) -> None:
    from harness.phases import scale_figures

    never = {"samples": 0, "failed_readings": 40, "spilled": None, "peak_bytes": None}
    figures = scale_figures(
        _scale_result(never), size=20, report_dir=tmp_path, server_name="ollama 0.34.0",
        predicted_memory_gb=9.0,
    )  # fmt: skip
    failed = _check(figures)
    assert "no memory reading of ollama 0.34.0 succeeded (40 failed)" in failed["memory.spilled"]
    assert "memory.failed_readings_rate = 1.000" in failed["memory.failed_readings_rate"]
    assert "memory.predicted_ratio_error" in failed


def test_memory_within_its_prediction_and_read_passes(tmp_path: Path) -> None:
    from harness.phases import scale_figures

    read = {"samples": 300, "failed_readings": 1, "spilled": False, "peak_bytes": 9.9e9,
            "source": "ollama:/api/ps gemma3:12b", "kind": "ollama"}  # fmt: skip
    figures = scale_figures(
        _scale_result(read), size=20, report_dir=tmp_path, predicted_memory_gb=9.0
    )
    assert figures["memory"]["predicted_ratio"] == pytest.approx(1.1)
    assert _check(figures) == {}
    far = dict(read, peak_bytes=12e9)  # 33% over phase 1's line
    figures = scale_figures(
        _scale_result(far), size=20, report_dir=tmp_path, predicted_memory_gb=9.0
    )
    assert set(_check(figures)) == {"memory.predicted_ratio_error"}


def test_flips_are_near_ties_when_the_two_scores_top_the_distribution_within_the_margin() -> None:
    def read(cid: str, s: int, dist: dict[str, float]) -> RequestRecord:
        r = rec(cid, s)
        r.scoring = {"mode": "logprobs", "distribution": dist, "expected": 0.0}
        return r

    its = items(4)
    tie = {"6": 0.48, "7": 0.46, "1": 0.06}
    far = {"6": 0.8, "7": 0.1, "1": 0.1}
    run_a = [read("c0", 6, tie), read("c1", 6, far), rec("c2", 3), read("c3", 5, tie)]
    run_b = [read("c0", 7, tie), read("c1", 7, far), rec("c2", 4), read("c3", 5, tie)]
    out = q.flips(its, run_a, run_b)
    assert [(f["custom_id"], f["near_tie"]) for f in out] == [
        ("c0", True),  # 6 and 7 are the top two, 0.02 apart
        ("c1", False),  # 0.7 apart: a real change
        ("c2", None),  # decoded: no distribution to tell
    ]
    # A decode-mode run told by the other mode's pass over the same candidates.
    other = {"c2": {"distribution": {"3": 0.5, "4": 0.49}}}
    assert q.flips(its, run_a, run_b, other)[2]["near_tie"] is True
    assert q.near_tie({"6": 0.5, "7": 0.3, "8": 0.2}, 6, 8, 0.05) is False  # 8 is not 2nd


def test_quality_figures_in_logprobs_mode_report_expected_scores_and_agreement() -> None:
    pool = items(25)
    backend = InProcessDouble(tokenizer=char_tokenize)

    def run(its: Sequence[WorkItem], strategy: str, mode: str = "logprobs") -> list[RequestRecord]:
        spec = JobSpec(
            strategy=strategy,
            policy=TrimPolicy(1_000_000),
            runner=RunnerConfig(score_mode=mode),
            progress=False,
            keep_records=True,
        )
        return asyncio.run(run_job(backend, list(its), spec)).records

    one_to_ten = {
        "type": "object",
        "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}},
        "required": ["score"],
    }
    scored = [replace(it, max_tokens=16, output_schema=one_to_ten) for it in pool]
    plan = q.plan_quality(scored, repeats=3, candidates=8, conversation_length=12, controls=2)
    runs = q.QualityRuns(
        repeats=run(plan.repeats, "stateless"),
        run_a=run(plan.candidates, "stateless"),
        run_b=run(plan.candidates, "stateless"),
        conversation=run(plan.conversation, "conversation"),
        bias=[],
        other_mode=run(plan.candidates, "stateless", "decode"),
        mode="logprobs",
    )
    figures = q.quality_figures(plan, runs, expected=None)
    assert figures["score_mode"] == "logprobs"
    assert figures["mode_agreement"] == 1.0 and figures["mode_agreement_rows"] == 8
    assert figures["expected_spread_repeats"] == 0.0
    assert figures["expected_drift"] == 0.0
    assert figures["expected_reproducible_max_diff"] == 0.0
    assert figures["flips"] == [] and figures["flips_not_near_tie"] == 0
    assert figures["near_tie_margin"] == q.NEAR_TIE_MARGIN


@pytest.mark.parametrize("shape", ["chat", "completion", "ollama"])
def test_decoded_flips_are_told_by_the_tokens_where_the_replies_part(shape: str) -> None:
    """Decoded replies carry each token's top log-probabilities (the quality suite asks them):
    a flip 1 -> 10 is a near-tie when, after `1`, `}` and `0` were within the margin. The
    evidence is read from the reply as the runner maps it (`rec.completion`), whichever body
    the server sent: OpenAI's chat reply, llama.cpp's `/completion` (the text and tokens
    paths: `completion_probabilities`), Ollama's `/api/chat` (`logprobs`)."""
    import math

    from harness.backends.base import ChatResult, Timings, Usage
    from harness.backends.completion import chat_completion

    def decoded(
        cid: str, value: int, tokens: list[str], tops: list[list[tuple[str, float]]]
    ) -> RequestRecord:
        entries = [
            {"token": t, "logprob": 0.0,
             "top_logprobs": [{"token": x, "logprob": math.log(p)} for x, p in top]}
            for t, top in zip(tokens, tops, strict=True)
        ]  # fmt: skip
        text = "".join(tokens)
        body: dict[str, Any] = {
            "chat": {"choices": [{"message": {"content": text}, "logprobs": {"content": entries}}]},
            "completion": {"content": text, "completion_probabilities": entries},
            "ollama": {"message": {"role": "assistant", "content": text}, "logprobs": entries},
        }[shape]
        r = rec(cid, value)
        result = ChatResult(text, "stop", Usage(10, len(tokens), 0), Timings(1.0), body)
        r.raw, r.completion = body, chat_completion(result, model="m")  # as the runner does
        return r

    head = ['{"', "score", '":', " ", "1"]
    same = [[("x", 0.9)]] * 5
    close = [("}", 0.48), ("0", 0.46), (",", 0.06)]
    a = decoded("c0", 1, [*head, "}"], [*same, close])
    b = decoded("c0", 10, [*head, "0", "}"], [*same, close, [("}", 0.9)]])
    (flip,) = q.flips(items(1), [a], [b])
    assert flip["near_tie"] is True and flip["decoded_gap_at_most"] == pytest.approx(0.02)
    far = [("}", 0.8), ("0", 0.1)]
    a2 = decoded("c0", 1, [*head, "}"], [*same, far])
    b2 = decoded("c0", 10, [*head, "0", "}"], [*same, far, [("}", 0.9)]])
    assert q.flips(items(1), [a2], [b2])[0]["near_tie"] is False
    assert q.flips(items(1), [rec("c0", 1)], [rec("c0", 10)])[0]["near_tie"] is None
    # Tokens the grammar forced, both below the listed ones (SmolLM2's `{` or `{"` at 0.03):
    # the gap is at most the smallest listed probability.
    tiny = [("N", 0.14), ("Here", 0.036), ("x", 0.03)]
    a3 = decoded("c0", 1, ["{", '"', "1", "}"], [tiny, *same[:3]])
    b3 = decoded("c0", 10, ['{"', "1", "0", "}"], [tiny, *same[:3]])
    (flip3,) = q.flips(items(1), [a3], [b3])
    assert flip3["decoded_gap_at_most"] == pytest.approx(0.03) and flip3["near_tie"] is True
