"""Agreement with a hand-scored sample (`harness.agreement`), each figure against an
independent reference: scikit-learn's weighted κ, scipy's rank correlations, small cases
worked by hand; and `harness labels` / `harness agree` as a user runs them."""

from __future__ import annotations

import csv
import json
import math
import random
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.agreement import MIN_ROWS, Pair, agree, labels_needed, quadratic_kappa, raters

sklearn_metrics = pytest.importorskip("sklearn.metrics")

SCALE = (1, 10)
scores = st.integers(min_value=1, max_value=10)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(scores, scores), min_size=2, max_size=60))
def test_quadratic_kappa_is_scikit_learns_over_the_whole_scale(
    pairs: list[tuple[int, int]],
) -> None:
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    mine = quadratic_kappa(a, b, SCALE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns where κ is undefined (nan)
        ref = sklearn_metrics.cohen_kappa_score(
            a, b, weights="quadratic", labels=list(range(1, 11))
        )
    if mine is None:
        assert math.isnan(ref)  # undefined there too
    else:
        assert mine == pytest.approx(ref, abs=1e-9)


def test_kappa_by_hand() -> None:
    # Two rows, 1-3 scale: (1,1), (3,3): perfect agreement.
    assert quadratic_kappa([1, 3], [1, 3], (1, 3)) == pytest.approx(1.0)
    # (1,3), (3,1): observed weighted disagreement 1 each; expected: marginals 1/2, 1/2 on
    # 1 and 3 both sides: E = 1/4 at each corner, weights 0,1,1,0 → 1/2; κ = 1 - 1/(1/2) = -1.
    assert quadratic_kappa([1, 3], [3, 1], (1, 3)) == pytest.approx(-1.0)
    # One value throughout on both sides: undefined, not 0 or 1.
    assert quadratic_kappa([2, 2, 2], [2, 2, 2], (1, 3)) is None


def _pairs(human: list[int], model: list[int]) -> list[Pair]:
    return [Pair(f"r{i}", h, m) for i, (h, m) in enumerate(zip(human, model, strict=True))]


def test_the_figures_match_their_references_with_cis_around_them() -> None:
    rng = random.Random(3)
    human = [rng.randint(1, 10) for _ in range(120)]
    model = [min(10, max(1, h + rng.choice((-1, 0, 0, 1)))) for h in human]
    a = agree(_pairs(human, model), seed=1)
    f = a.figures
    assert a.n == 120
    assert f["exact"].value == pytest.approx(
        sum(h == m for h, m in zip(human, model, strict=True)) / 120
    )
    assert f["within_1"].value == 1.0
    assert f["mae"].value == pytest.approx(
        sum(abs(h - m) for h, m in zip(human, model, strict=True)) / 120
    )
    ref = sklearn_metrics.cohen_kappa_score(
        human, model, weights="quadratic", labels=list(range(1, 11))
    )
    assert f["kappa_quadratic"].value == pytest.approx(ref)
    from scipy import stats

    assert f["spearman"].value == pytest.approx(stats.spearmanr(human, model).statistic)
    assert f["kendall"].value == pytest.approx(stats.kendalltau(human, model).statistic)
    for name in ("exact", "mae", "kappa_quadratic", "spearman", "kendall"):
        lo, hi = f[name].ci or (None, None)
        assert lo is not None and hi is not None and lo <= f[name].value <= hi, name
    # Seeded: the same CI again.
    assert (
        agree(_pairs(human, model), seed=1).figures["kappa_quadratic"].ci == f["kappa_quadratic"].ci
    )
    assert sum(map(sum, a.confusion)) == 120
    assert all(d["human"] != d["model"] for d in a.disagreements)


def test_noise_of_known_size_gives_the_kappa_its_analysis_predicts() -> None:
    """Scores = labels + noise of known law: κ's CI holds κ computed on the law itself."""
    rng = random.Random(11)
    human = [rng.randint(1, 10) for _ in range(400)]
    noise = (-2, -1, 0, 0, 0, 1, 2)
    model = [min(10, max(1, h + rng.choice(noise))) for h in human]
    big_h = [rng.randint(1, 10) for _ in range(200_000)]
    big_m = [min(10, max(1, h + rng.choice(noise))) for h in big_h]
    analytic = quadratic_kappa(big_h, big_m, SCALE)
    assert analytic is not None
    lo, hi = agree(_pairs(human, model), seed=2).figures["kappa_quadratic"].ci or (0, 0)
    assert lo <= analytic <= hi


def test_a_model_that_gives_every_row_the_same_score_has_kappa_zero_and_no_rank_correlation() -> (
    None
):
    rng = random.Random(5)
    human = [rng.randint(1, 10) for _ in range(60)]
    a = agree(_pairs(human, [7] * 60))
    assert a.figures["kappa_quadratic"].value == pytest.approx(0.0, abs=1e-9)
    for name in ("spearman", "kendall"):
        assert a.figures[name].value is None and "same" in (a.figures[name].reason or "")


def test_under_ten_rows_every_figure_is_none_with_the_reason() -> None:
    a = agree(_pairs([1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert MIN_ROWS == 10 and a.n == 9
    assert all(f.value is None and "under 10" in (f.reason or "") for f in a.figures.values())


def test_two_raters_agreement_is_the_ceiling_and_labels_needed_shrink_as_root_n() -> None:
    rng = random.Random(8)
    first = [rng.randint(1, 10) for _ in range(100)]
    second = [min(10, max(1, s + rng.choice((-1, 0, 1)))) for s in first]
    got = raters([("human_score", first), ("human_score_2", second)])
    (fig,) = got.values()
    assert list(got) == ["human_score~human_score_2"] and fig.value is not None and fig.value > 0.8
    assert fig.ci is not None
    width = fig.ci[1] - fig.ci[0]
    assert labels_needed(fig, width / 2) == pytest.approx(4 * fig.n, rel=0.02)


# -- harness labels / harness agree, as a user runs them ----------------------------------------


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_labels_then_a_run_then_agree_on_its_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness.cli import main
    from harness.run import execute
    from harness.testing import InProcessDouble
    from harness.workload import write_candidates_csv

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(execute, "open_backend", lambda cfg: InProcessDouble())
    write_candidates_csv("c.csv", 80, seed=4)
    assert main(["labels", "c.csv", "--sample", "50", "--raters", "2"]) == 0
    sheet = _read(Path("c_labels.csv"))
    assert len(sheet) == 50 and sheet[0]["human_score"] == "" and "human_score_2" in sheet[0]
    ids = [r["id"] for r in _read(Path("c.csv"))]
    assert [r["id"] for r in sheet] == [i for i in ids if i in {r["id"] for r in sheet}]
    assert main(["labels", "c.csv", "--sample", "50"]) == 2  # never over a filled sheet
    assert "exists" in capsys.readouterr().err
    assert main(["run", "c.csv", "--no-progress"]) == 0
    model = {
        ln["custom_id"]: ln["harness"]["parsed"]["score"]
        for ln in map(json.loads, Path("c_results.jsonl").read_text().splitlines())
    }
    # The person agrees with the model on 40 of 50 rows, one point apart on the others; a
    # second rater agrees with the first everywhere but 5 rows.
    for i, row in enumerate(sheet):
        s = model[row["id"]]
        row["human_score"] = str(s if i % 5 else (s + 1 if s < 10 else s - 1))
        row["human_score_2"] = str(row["human_score"] if i % 10 else model[row["id"]])
    with Path("c_labels.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(sheet[0]))
        w.writeheader()
        w.writerows(sheet)
    capsys.readouterr()
    assert main(["agree", "c_labels.csv", "c_results.jsonl", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    figures = got["agreement"]["figures"]
    assert got["agreement"]["n"] == 50 and figures["exact"]["value"] == pytest.approx(0.8)
    assert figures["within_1"]["value"] == 1.0 and figures["mae"]["value"] == pytest.approx(0.2)
    human = [int(r["human_score"]) for r in sheet]
    ref = sklearn_metrics.cohen_kappa_score(
        human, [model[r["id"]] for r in sheet], weights="quadratic", labels=list(range(1, 11))
    )
    assert figures["kappa_quadratic"]["value"] == pytest.approx(ref)
    lo, hi = figures["kappa_quadratic"]["ci95"]
    assert lo <= ref <= hi and got["labels_needed"] > 0
    assert list(got["raters"]) == ["human_score~human_score_2"]
    assert len(got["agreement"]["disagreements"]) == 10
    assert main(["agree", "c_labels.csv", "c_scores.csv"]) == 0  # the scores CSV works too
    text = capsys.readouterr().out
    assert "Cohen's κ (quadratic weights):" in text and "(n=50)" in text
    assert "raters human_score and human_score_2" in text


def test_agree_on_a_few_rows_says_na_and_names_a_bad_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    Path("s.csv").write_text(
        "id,human_score,score\n" + "".join(f"r{i},{1 + i % 9},{1 + i % 9}\n" for i in range(6)),
        encoding="utf-8",
    )
    assert main(["agree", "s.csv"]) == 0
    assert "n/a (6 comparable rows, under 10)" in capsys.readouterr().out
    Path("s.csv").write_text("id,human_score,score\nr1,seven,3\n", encoding="utf-8")
    assert main(["agree", "s.csv"]) == 2
    assert "s.csv:2: human_score: 'seven' is not a score" in capsys.readouterr().err
