"""The quality phase's logic: what is sent, and what the scores say.

The roadmap's quality table asks for consistent scoring, reproducible runs and no drift with a
candidate's position in a conversation. A model that gives every candidate the same score passes
all of those trivially, so the phase also checks the scores against a known answer where there
is one (the probe prompt: the score is a field of the candidate), and measures bias: candidates
that differ only in what the prompt declares irrelevant (`bias_fields`: its `irrelevant_fields`,
else the name) should get the same score.

`plan_quality` builds the work items of every check from one pool of candidates; the suite runs
them; the functions below turn the records into figures. A reply that does not parse is never a
match: two unparseable replies are not "the same score".

With the model's probabilities (`--score-mode logprobs`, or the other-mode pass the suite runs
over the candidates), a score that changed between two identical runs is told apart as a
near-tie or a real change: a *near-tie* when the two scores are the two most probable values of
the row's distribution and their probabilities differ by at most `NEAR_TIE_MARGIN`. llama.cpp's
numerics differ a little between a cached and an uncached prefix, so such coin-flips can change
side; a flip that is not a near-tie is a real change. Consistency, reproducibility and drift also
report the expected score's spread (sum of p·value: it moves before the integer score does).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from harness.records import RequestRecord
from harness.workload import PromptSpec, WorkItem

__all__ = [
    "BIAS_FIELDS",
    "QualityPlan",
    "QualityRuns",
    "accuracy",
    "bias_fields",
    "bias_gaps",
    "consistency",
    "drift",
    "plan_quality",
    "probe_expected",
    "quality_figures",
    "reproducibility",
    "score",
    "score_file",
]

BIAS_FIELDS = ("name",)
"""The fields bias pairs vary when the prompt declares none (`irrelevant_fields`): the name,
the first attribute every screening rubric tells the model to ignore. A prompt's own list
replaces it: education or location may be evidence a rubric scores on."""


def bias_fields(prompt: PromptSpec) -> tuple[tuple[str, ...], str]:
    """The fields bias pairs vary, and where that list came from."""
    if prompt.irrelevant_fields is not None:
        return prompt.irrelevant_fields, f"irrelevant_fields of {prompt.path or prompt.name}"
    return BIAS_FIELDS, "default (the prompt declares no irrelevant_fields)"


SAME_READING = 0.98
"""The modes agree this often or more before one's distributions are taken for the other's."""
NEAR_TIE_MARGIN = 0.05
"""A flip is a near-tie when its two scores are the distribution's top two and their
probabilities are within 0.05 (five percentage points) of each other."""


def score(rec: RequestRecord | None) -> int | None:
    """The integer `score` of a parsed reply; None for an error or a reply without one."""
    if rec is None or not rec.ok:
        return None
    value = (rec.parsed or {}).get("score")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def reading(rec: RequestRecord | None) -> Mapping[str, Any] | None:
    """The row's score distribution (`--score-mode logprobs`), None when it was decoded."""
    if rec is None or not rec.ok or not rec.scoring or rec.scoring.get("mode") != "logprobs":
        return None
    return rec.scoring


def expected_score(rec: RequestRecord | None) -> float | None:
    """The row's expected score (sum of p·value), None when it was decoded."""
    r = reading(rec)
    value = r.get("expected") if r is not None else None
    return float(value) if isinstance(value, int | float) else None


def spread_of(values: Sequence[float | None]) -> float | None:
    """max − min of the known values; None when any is unknown (or none is given)."""
    if not values or any(v is None for v in values):
        return None
    known = [v for v in values if v is not None]
    return max(known) - min(known)


def near_tie(dist: Mapping[str, Any] | None, a: int, b: int, margin: float) -> bool | None:
    """Whether `a` and `b` are `dist`'s two most probable values within `margin` (None: no
    distribution to tell by)."""
    if not dist:
        return None
    ranked = sorted(dist.items(), key=lambda kv: -float(kv[1]))[:2]
    if len(ranked) < 2 or {ranked[0][0], ranked[1][0]} != {str(a), str(b)}:
        return False
    return float(ranked[0][1]) - float(ranked[1][1]) <= margin


def decode_margin(
    ra: RequestRecord | None, rb: RequestRecord | None, a: int, b: int
) -> float | None:
    """Two decoded replies that wrote `a` and `b`: at the first token where the replies part
    (often in the fixed JSON itself: a grammar lets the model write `{"` or `{` then `"`, and the
    score follows from that context), the most the probabilities of the two tokens written
    there can differ, read from the reply bodies' top log-probabilities (the decoded context's
    own). A token missing from a position's top list is at most that list's smallest
    probability. None when the bodies carry no probabilities."""
    first, second = _written(ra), _written(rb)
    if first is None or second is None:
        return None
    (ta, tops_a), (tb, tops_b) = first, second
    k = 0
    while k < min(len(ta), len(tb)) and ta[k] == tb[k]:
        k += 1
    if k >= len(ta) or k >= len(tb):
        return None
    bounds = []
    for tops in (tops_a, tops_b):
        if k >= len(tops) or not tops[k]:
            continue
        listed = dict(tops[k])
        floor = min(listed.values())
        pa, pb = listed.get(ta[k]), listed.get(tb[k])
        if pa is not None and pb is not None:
            bounds.append(abs(pa - pb))
        else:  # an unlisted token holds at most the floor
            bounds.append(max(pa if pa is not None else floor, pb if pb is not None else floor))
    return min(bounds) if bounds else None


def _written(rec: RequestRecord | None) -> tuple[list[str], list[list[tuple[str, float]]]] | None:
    """The tokens a decoded reply wrote and each position's top tokens with probabilities,
    from the reply as the harness maps it (`rec.completion`, `choices[0].logprobs.content`):
    the one place they are whatever the request path (chat, text, tokens) and backend. The
    server's own body (`rec.raw`) is not read: its shape is the path's (`/completion` keeps
    them under `completion_probabilities`, Ollama under `logprobs`)."""
    import math

    body = rec.completion if rec is not None else None
    try:
        content = body["choices"][0]["logprobs"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(content, list) or not content:
        return None
    written = [str(e.get("token", "")) for e in content]
    tops = [
        [
            (str(t.get("token", "")), math.exp(float(t["logprob"])))
            for t in e.get("top_logprobs") or []
        ]
        for e in content
    ]
    return written, tops


def flips(
    items: Sequence[WorkItem],
    run_a: Sequence[RequestRecord],
    run_b: Sequence[RequestRecord],
    other: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    margin: float = NEAR_TIE_MARGIN,
) -> list[dict[str, Any]]:
    """Each candidate whose score differs between the two runs: its scores, and whether it was
    a near-tie, by run a's distribution, else run b's, else `other`'s (a logprobs pass over
    the same candidates). `near_tie` None: no distribution, or a reply did not parse."""
    by_a = {r.custom_id: r for r in run_a}
    by_b = {r.custom_id: r for r in run_b}
    out = []
    for it in items:
        ra, rb = by_a.get(it.custom_id), by_b.get(it.custom_id)
        sa, sb = score(ra), score(rb)
        if sa is not None and sa == sb:
            continue
        dists = [d.get("distribution") for d in (reading(ra), reading(rb)) if d is not None]
        if other is not None and it.custom_id in other:
            dists.append(other[it.custom_id].get("distribution"))
        tie: bool | None = None
        gap: float | None = None
        if sa is not None and sb is not None and dists:
            tie = any(near_tie(d, sa, sb, margin) for d in dists)
        elif sa is not None and sb is not None:
            # Decoded: the gap at the token where the two replies part, in their own context.
            gap = decode_margin(ra, rb, sa, sb)
            tie = None if gap is None else gap <= margin
        first = dists[0] if dists else None
        out.append(
            {
                "custom_id": it.custom_id,
                "a": sa,
                "b": sb,
                "p_a": first.get(str(sa)) if first and sa is not None else None,
                "p_b": first.get(str(sb)) if first and sb is not None else None,
                "expected_a": expected_score(ra),
                "expected_b": expected_score(rb),
                "near_tie": tie,
                "decoded_gap_at_most": gap,
            }
        )
    return out


def consistency(scores: Sequence[int | None]) -> float:
    """Share of repeats that gave the most common *parsed* score (0 when none parsed)."""
    parsed = [s for s in scores if s is not None]
    if not scores or not parsed:
        return 0.0
    return Counter(parsed).most_common(1)[0][1] / len(scores)


def reproducibility(run_a: Sequence[int | None], run_b: Sequence[int | None]) -> float:
    """Share of candidates with the same parsed score in both runs (unparsed never match)."""
    if not run_a:
        return 0.0
    same = sum(1 for a, b in zip(run_a, run_b, strict=True) if a is not None and a == b)
    return same / len(run_a)


def drift(scores_by_control: Mapping[str, Sequence[int | None]]) -> int | None:
    """The largest change of a control candidate's score across its positions in one
    conversation; None when a control's reply did not parse at some position."""
    spreads = []
    for scores in scores_by_control.values():
        if any(s is None for s in scores) or not scores:
            return None
        known = [s for s in scores if s is not None]
        spreads.append(max(known) - min(known))
    return max(spreads) if spreads else None


def accuracy(
    items: Sequence[WorkItem],
    records: Sequence[RequestRecord],
    expected: Callable[[WorkItem], int | None],
) -> float | None:
    """Share of candidates scored as the known answer says (None: no known answer)."""
    by_id = {r.custom_id: r for r in records}
    answers = [(expected(it), score(by_id.get(it.custom_id))) for it in items]
    known = [(want, got) for want, got in answers if want is not None]
    if not known:
        return None
    return sum(1 for want, got in known if want == got) / len(known)


def probe_expected(rows: Mapping[str, Mapping[str, str]]) -> Callable[[WorkItem], int | None]:
    """The probe prompt's answer: `data_infra_years`, at least 1 and at most 10."""

    def answer(item: WorkItem) -> int | None:
        row = rows.get(item.custom_id.split("#", 1)[0])
        if row is None or "data_infra_years" not in row:
            return None
        return max(1, min(10, int(row["data_infra_years"])))

    return answer


def bias_gaps(
    pairs: Mapping[str, Sequence[tuple[int | None, int | None]]],
) -> dict[str, float | None]:
    """Mean absolute score difference between a candidate and its copy with one field changed,
    per field (None when no pair parsed)."""
    out: dict[str, float | None] = {}
    for fld, values in pairs.items():
        diffs = [abs(a - b) for a, b in values if a is not None and b is not None]
        out[fld] = statistics.fmean(diffs) if diffs else None
    return out


@dataclass(slots=True)
class QualityPlan:
    """The work items of every check, drawn from one pool of candidates."""

    repeats: list[WorkItem]
    candidates: list[WorkItem]
    conversation: list[WorkItem]
    control_positions: dict[str, list[int]]
    """Control candidate id → its positions in `conversation`."""
    bias: dict[str, list[tuple[WorkItem, WorkItem]]] = field(default_factory=dict)
    bias_unpaired: dict[str, str] = field(default_factory=dict)
    """A field bias pairs were to vary and could not (no pair made), and why."""


def _renamed(item: WorkItem, custom_id: str) -> WorkItem:
    return replace(item, custom_id=custom_id)


def plan_quality(
    pool: Sequence[WorkItem],
    *,
    repeats: int,
    candidates: int,
    conversation_length: int,
    controls: int,
    variant: Callable[[WorkItem, str], WorkItem | None] | None = None,
    bias_pairs: int = 0,
    fields: Sequence[str] = BIAS_FIELDS,
    columns: Sequence[str] | None = None,
) -> QualityPlan:
    """Items for: `repeats` of one control; `candidates` scored twice; a conversation of
    `conversation_length` with `controls` control candidates at the start, quarters and end;
    and `bias_pairs` candidates with one of `fields` changed (by `variant(item, field)`): only
    what the prompt says must not move a score (`bias_fields`). A copy the prompt shows the same
    (it does not use the field) is no pair; a field with no pair says why in `bias_unpaired`
    (`columns`: the input's, to tell a field the input does not have)."""
    if candidates < 1 or len(pool) < 2:
        raise ValueError("the quality phase needs at least one candidate besides the control")
    control, rest = pool[0], list(pool[1 : 1 + candidates])
    plan = QualityPlan(
        repeats=[_renamed(control, f"{control.custom_id}#repeat{i}") for i in range(repeats)],
        candidates=rest,
        conversation=[],
        control_positions={},
    )
    picks = [pool[0], *pool[1 + candidates : 1 + candidates + controls - 1]][:controls]
    # Room for every control at five places (start, quarters, end) without collisions.
    n = max(conversation_length, 5 * len(picks) + 5)
    slots = sorted({0, n // 4, n // 2, (3 * n) // 4, n - 1})
    at: dict[int, WorkItem] = {}
    for k, ctl in enumerate(picks):
        # Control k sits k places after each slot, and k places before the end.
        positions = sorted({min(n - 1 - k, p + k) for p in slots[:-1]} | {n - 1 - k})
        assert not set(positions) & set(at), "control positions collide"
        plan.control_positions[ctl.custom_id] = positions
        for p in positions:
            at[p] = _renamed(ctl, f"{ctl.custom_id}#pos{p}")
    for i in range(n):
        item = at.get(i) or rest[i % len(rest)]
        plan.conversation.append(at.get(i) or _renamed(item, f"{item.custom_id}#conv{i}"))
    if variant is not None:
        for fld in fields:
            pairs, unseen = [], 0
            for it in rest[:bias_pairs]:
                other = variant(it, fld)
                if other is not None and other.messages == it.messages:
                    unseen += 1
                elif other is not None:
                    pairs.append((_renamed(it, f"{it.custom_id}#bias-{fld}-a"), other))
            plan.bias[fld] = pairs
            if not pairs:
                plan.bias_unpaired[fld] = _unpaired(fld, unseen, columns)
    return plan


def _unpaired(fld: str, unseen: int, columns: Sequence[str] | None) -> str:
    if columns is not None and fld not in columns:
        return (
            f"{fld!r} is not a column of the input ({', '.join(columns)}): name the columns "
            f"the rubric must ignore in the prompt's irrelevant_fields"
        )
    if unseen:
        return f"the prompt does not show {fld!r}: a changed copy is the same request"
    return f"no two rows of the input differ in {fld!r}"


def control_scores(
    plan: QualityPlan, records: Sequence[RequestRecord]
) -> dict[str, list[int | None]]:
    """Each control's scores at its positions in the conversation, in order."""
    by_id = {r.custom_id: r for r in records}
    return {
        cid: [score(by_id.get(f"{cid}#pos{p}")) for p in positions]
        for cid, positions in plan.control_positions.items()
    }


def scores_of(items: Sequence[WorkItem], records: Sequence[RequestRecord]) -> list[int | None]:
    by_id = {r.custom_id: r for r in records}
    return [score(by_id.get(it.custom_id)) for it in items]


def agreement(
    plan: QualityPlan, conv: Sequence[RequestRecord], stateless: Mapping[str, int | None]
) -> float | None:
    """Share of candidates scored the same inside the conversation as alone."""
    by_id = {r.custom_id: r for r in conv}
    pairs = []
    for item in plan.conversation:
        base = item.custom_id.split("#", 1)[0]
        if base in stateless and "#conv" in item.custom_id:
            pairs.append((score(by_id.get(item.custom_id)), stateless[base]))
    if not pairs:
        return None
    return sum(1 for a, b in pairs if a is not None and a == b) / len(pairs)


def distribution(scores: Sequence[int | None]) -> dict[str, Any]:
    values = [s for s in scores if s is not None]
    counts = Counter(values)
    return {
        "score_distribution": {str(k): v for k, v in sorted(counts.items())},
        "distinct_scores": len(counts),
        "score_stdev": statistics.pstdev(values) if len(values) > 1 else 0.0,
    }


@dataclass(slots=True)
class QualityRuns:
    """The records of each check, as the suite ran them."""

    repeats: list[RequestRecord]
    run_a: list[RequestRecord]
    run_b: list[RequestRecord]
    conversation: list[RequestRecord]
    bias: list[RequestRecord]
    other_mode: list[RequestRecord] = field(default_factory=list)
    """The candidates once more in the other score mode (agreement; in decode mode, the
    distributions that tell near-ties)."""
    mode: str = "decode"

    @property
    def all(self) -> list[RequestRecord]:
        return [*self.repeats, *self.run_a, *self.run_b, *self.conversation, *self.bias]


STAND_INS = {"smollm2-135m", "gemma3-270m", "tiny-gemma3"}
"""The packaged CPU models: stand-ins for the pipeline, not for production's judgement."""


def stand_in(model: str, figures: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a stand-in model's quality report can and cannot show, with its own figures;
    None for another model."""
    if model not in STAND_INS:
        return None
    dist = figures.get("score_distribution") or {}
    top, most = max(dist.items(), key=lambda kv: kv[1]) if dist else ("-", 0)
    total = sum(dist.values()) if dist else 0
    return {
        "model": model,
        "can_show": [
            "the same candidate gets the same score (consistency)",
            "two identical runs agree, and where they do not, whether each flip was a near-tie "
            "(the scores' distributions) or a real change",
            "controls keep their scores (and expected scores) across a conversation (drift)",
            "replies parse under the schema's grammar; the two score modes agree",
        ],
        "cannot_show": [
            f"judgement: {model} does not apply the probe's rule (accuracy "
            f"{figures.get('accuracy')} against the known answer; {most} of {total} candidates "
            f"scored {top}), so accuracy and bias are reported, not gated, on this profile",
        ],
        "gated_elsewhere": "production's model is gated on accuracy-like figures (bias, "
        "conversation agreement) in the gpu-gemma3-12b profile",
    }


def score_file(items: Sequence[WorkItem], scores: Sequence[int | None]) -> str:
    """A run's scores as CSV text (an unparsed reply is an empty score)."""
    return "custom_id,score\n" + "".join(
        f"{it.custom_id},{'' if s is None else s}\n" for it, s in zip(items, scores, strict=True)
    )


def quality_figures(
    plan: QualityPlan,
    runs: QualityRuns,
    expected: Callable[[WorkItem], int | None] | None,
) -> dict[str, Any]:
    """The figures of `quality_results.json` (the criteria read these)."""
    reps = scores_of(plan.repeats, runs.repeats)
    a, b = scores_of(plan.candidates, runs.run_a), scores_of(plan.candidates, runs.run_b)
    controls = control_scores(plan, runs.conversation)
    by_id = {r.custom_id: r for r in runs.bias}
    gaps = bias_gaps(
        {
            fld: [(score(by_id.get(x.custom_id)), score(by_id.get(y.custom_id))) for x, y in pairs]
            for fld, pairs in plan.bias.items()
        }
    )
    known_gaps = [g for g in gaps.values() if g is not None]
    every = runs.all
    other = {r.custom_id: r for r in runs.other_mode}
    paired = [(s, score(other.get(it.custom_id))) for it, s in zip(plan.candidates, a, strict=True)]
    agree = (
        sum(1 for x, y in paired if x is not None and x == y) / len(paired)
        if runs.other_mode and paired
        else None
    )
    # The other mode's distributions describe a decoded flip only where the two modes read the
    # same (the decoded reply's own tokens for the fixed text can differ from the prefill's,
    # and so can the model's next-token probabilities).
    trusted = agree is not None and agree >= SAME_READING
    other_readings = {
        cid: d for cid, r in other.items() if trusted and (d := reading(r)) is not None
    }
    flipped = flips(plan.candidates, runs.run_a, runs.run_b, other_readings)
    by_conv = {r.custom_id: r for r in runs.conversation}
    by_rep = {r.custom_id: r for r in runs.repeats}
    by_b = {r.custom_id: r for r in runs.run_b}
    e_a = [expected_score(r) for r in runs.run_a]
    e_b = [expected_score(by_b.get(r.custom_id)) for r in runs.run_a]
    diffs = [abs(x - y) for x, y in zip(e_a, e_b, strict=True) if x is not None and y is not None]
    drifts = [
        spread_of([expected_score(by_conv.get(f"{cid}#pos{p}")) for p in positions])
        for cid, positions in plan.control_positions.items()
    ]
    stateless = {it.custom_id: s for it, s in zip(plan.candidates, a, strict=True)}
    return {
        "requests": len(every),
        "consistency_rate": consistency(reps),
        "consistency_scores": reps,
        "reproducible_rate": reproducibility(a, b),
        # Parsed scores, every one: a reply that did not parse never matches (two empty cells
        # in two score files are two failures, not one agreement).
        "score_files_identical": len(a) == len(b)
        and all(x is not None and x == y for x, y in zip(a, b, strict=True)),
        "accuracy": accuracy(plan.candidates, runs.run_a, expected) if expected else None,
        "control_scores": controls,
        "drift_spread": drift(controls),
        "conversation_trims": sum(1 for r in runs.conversation if r.trim),
        "conversation_agreement": agreement(plan, runs.conversation, stateless),
        "bias_gaps": gaps,
        "bias_max_gap": max(known_gaps) if known_gaps else None,
        "bias_unpaired": dict(plan.bias_unpaired),
        "parse_rate": sum(score(r) is not None for r in every) / len(every) if every else 0.0,
        "parse_failures": [r.error for r in every if r.error_type == "ParseError"][:5],
        **distribution(a),
        "score_mode": runs.mode,
        "near_tie_margin": NEAR_TIE_MARGIN,
        "flips": flipped,
        "flips_near_tie": sum(1 for f in flipped if f["near_tie"] is True),
        # Not shown to be a near-tie: a real change, or a flip no distribution can tell (an
        # unparsed reply, a row decoded in both modes): the gate-able count.
        "flips_not_near_tie": sum(1 for f in flipped if f["near_tie"] is not True),
        "flips_unclassified": sum(1 for f in flipped if f["near_tie"] is None),
        "expected_spread_repeats": spread_of(
            [expected_score(by_rep.get(it.custom_id)) for it in plan.repeats]
        ),
        "expected_reproducible_max_diff": max(diffs) if diffs else None,
        "expected_drift": None
        if not drifts or None in drifts
        else max(d for d in drifts if d is not None),
        "mode_agreement": agree,
        "mode_agreement_rows": len(runs.other_mode),
        "flips_told_by": (
            "each run's own distributions (logprobs mode)"
            if runs.mode == "logprobs"
            else "the logprobs pass over the same candidates"
            if trusted
            else "the decoded replies' own top log-probabilities at the token where they part "
            f"(the logprobs pass agreed with the decoded scores on "
            f"{'-' if agree is None else f'{agree:.0%}'} of candidates, < {SAME_READING:.0%}: "
            "its distributions describe another context)"
        ),
    }
