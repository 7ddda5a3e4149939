"""`harness labels` writes a sheet to hand-score; `harness agree` compares it with the model.

    harness labels candidates.csv --sample 200 [--raters 2]   → candidates_labels.csv
    harness agree candidates_labels.csv candidates_results.jsonl [--ci-width 0.1] [--json]

The sheet is a seeded random sample of the input's rows (kept in input order, every column
kept) with an empty `human_score` column, one per rater with `--raters N` (`human_score`,
`human_score_2`, ...). An existing sheet is never overwritten (it may hold a day of scoring).

`harness agree` reads the filled sheet and the model's scores: a `harness run` results file
(`.jsonl`: the final line of each id, its score, and in logprobs mode its probability and
expected score), a scores CSV, or, with no second file, a `score` column of the sheet itself.
It prints `harness.agreement`'s figures for the first rater (κ with its CI above all), the
raters' agreement with each other where there are several, the confusion matrix, the largest
disagreements, and the labelled rows a CI of `--ci-width` needs.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.agreement import FIGURES, Agreement, Figure, Pair, agree, labels_needed, raters
from harness.csvfile import CsvFile, Rejected
from harness.errors import ConfigError, InputError
from harness.fileio import atomic_write_text
from harness.lock import hold, lock_path_for
from harness.scoresfile import index_results
from harness.workload import bad_rows, sample_rows

__all__ = ["RATER", "AgreeResult", "agree_files", "parse_scale", "write_sheet"]

RATER = "human_score"
"""The sheet's score column; more raters: `human_score_2`, `human_score_3`, ..."""


def write_sheet(
    input_path: Path,
    *,
    sample: int,
    seed: int = 0,
    id_column: str = "id",
    raters_n: int = 1,
    output: Path | None = None,
) -> tuple[Path, int, int]:
    """Write the labelling sheet; returns (its path, rows in it, rows in the input)."""
    if sample < 1 or raters_n < 1:
        raise ConfigError("--sample and --raters must be at least 1")
    f = CsvFile(input_path, id_column)
    bad: list[Rejected] = []
    rows = [row for _, _, row in f.rows(bad)]
    if bad:
        raise bad_rows(input_path, [(r.line, r.reason) for r in bad])
    taken = [RATER] + [f"{RATER}_{i}" for i in range(2, raters_n + 1)]
    clash = [c for c in taken if c in f.columns]
    if clash:
        raise ConfigError(f"{input_path} already has a column {clash[0]!r}: rename it first")
    out = output or input_path.with_name(f"{input_path.stem}_labels.csv")
    if out.exists():
        raise ConfigError(
            f"{out} exists (it may hold scores already): fill it in, or choose another --output"
        )
    chosen = [rows[i] for i in sample_rows(range(len(rows)), sample, seed)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*f.columns, *taken])
    for row in chosen:
        w.writerow([*(row[c] for c in f.columns), *([""] * len(taken))])
    with hold(lock_path_for(out), what=f"the labelling sheet {out}"):
        atomic_write_text(out, buf.getvalue())
    return out, len(chosen), len(rows)


def _score(text: str, where: str) -> int | None:
    t = text.strip()
    if not t:
        return None
    try:
        value = float(t)
    except ValueError:
        raise InputError(f"{where}: {t!r} is not a score") from None
    if not value.is_integer():
        raise InputError(f"{where}: {t!r} is not a whole score")
    return int(value)


@dataclass(frozen=True, slots=True)
class _Model:
    score: int | None
    p: float | None = None
    expected: float | None = None


def _from_results(path: Path) -> dict[str, _Model]:
    import orjson

    out: dict[str, _Model] = {}
    index = index_results(path)
    with path.open("rb") as fh:
        for cid, (offset, error) in index.items():
            if error:
                out[cid] = _Model(None)
                continue
            fh.seek(offset)
            line = orjson.loads(fh.readline())
            h: Mapping[str, Any] = line.get("harness") or {}
            parsed = h.get("parsed")
            score = parsed.get("score") if isinstance(parsed, Mapping) else None
            raw = h.get("scoring")
            scoring: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
            out[cid] = _Model(
                score if isinstance(score, int) and not isinstance(score, bool) else None,
                _float(scoring.get("p")),
                _float(scoring.get("expected")),
            )
    return out


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _from_csv(path: Path, id_column: str) -> dict[str, _Model]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        key = id_column if id_column in cols else "custom_id" if "custom_id" in cols else None
        if key is None or "score" not in cols:
            raise InputError(
                f"a scores CSV needs the id column ({id_column} or custom_id) and score; it has: "
                f"{', '.join(cols)}",
                path=str(path),
            )
        out = {}
        for n, row in enumerate(reader, start=2):
            out[row[key]] = _Model(
                _score(row.get("score") or "", f"{path}:{n}: score"),
                _float_text(row.get("score_p")),
                _float_text(row.get("score_expected")),
            )
    return out


def _float_text(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


@dataclass(slots=True)
class AgreeResult:
    rater: str
    agreement: Agreement
    raters: dict[str, Figure]
    needed: int | None
    ci_width: float
    sheet: Path
    model_source: str

    def lines(self) -> list[str]:
        a = self.agreement
        out = [
            f"agreement of the model ({self.model_source}) with {self.rater} ({self.sheet}): "
            f"{a.n} rows with both scores of {a.labelled} labelled"
            + (f"; no model score for {len(a.missing_model)}" if a.missing_model else "")
        ]
        for name, what in FIGURES.items():
            if name in a.figures:
                out.append(f"  {what}: {a.figures[name].text()}")
        for pair, fig in self.raters.items():
            out.append(f"  raters {pair.replace('~', ' and ')}, κ (quadratic): {fig.text()}")
        kappa = a.figures.get("kappa_quadratic")
        if kappa is not None and kappa.ci is not None:
            out.append(
                f"  labels for a κ CI {self.ci_width} wide: about {self.needed} (this CI is "
                f"{kappa.ci[1] - kappa.ci[0]:.3f} wide at n={kappa.n}; the width goes as 1/√n)"
            )
        lo = a.scale[0]
        out.append("  confusion (rows: the person's score; columns: the model's, "
                   f"{lo}..{a.scale[1]}):")  # fmt: skip
        out += [f"    {lo + i:>2}: {' '.join(f'{c:>3}' for c in row)}"
                for i, row in enumerate(a.confusion) if any(row)]  # fmt: skip
        if a.disagreements:
            out.append("  largest disagreements (id: person, model, model's p):")
            out += [
                f"    {d['id']}: {d['human']}, {d['model']}"
                + (f", p {d['p']:.2f}" if d["p"] is not None else "")
                for d in a.disagreements[:10]
            ]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "rater": self.rater,
            "sheet": str(self.sheet),
            "model_source": self.model_source,
            "agreement": self.agreement.to_dict(),
            "raters": {k: f.to_dict() for k, f in self.raters.items()},
            "ci_width": self.ci_width,
            "labels_needed": self.needed,
        }


def agree_files(
    sheet: Path,
    results: Path | None = None,
    *,
    id_column: str = "id",
    scale: tuple[int, int] = (1, 10),
    ci_width: float = 0.1,
    seed: int = 0,
) -> AgreeResult:
    """The filled sheet against the model's scores (see the module doc)."""
    with sheet.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = list(reader.fieldnames or [])
        table = list(enumerate(reader, start=2))
    if id_column not in cols:
        raise InputError(
            f"no id column {id_column!r} (choose it with --id-column); columns: {', '.join(cols)}",
            path=str(sheet),
        )
    rater_cols = [c for c in cols if c == RATER or c.startswith(f"{RATER}_")]
    if not rater_cols:
        raise InputError(f"no {RATER} column: make the sheet with harness labels", path=str(sheet))
    human = {
        c: [_score(row.get(c) or "", f"{sheet}:{n}: {c}") for n, row in table] for c in rater_cols
    }
    ids = [row[id_column] for _, row in table]
    if results is None:
        if "score" not in cols:
            raise InputError(
                "no model scores: give the run's results file (or scores CSV) after the sheet",
                path=str(sheet),
            )
        model = {row[id_column]: _Model(_score(row.get("score") or "", f"{sheet}:{n}: score"))
                 for n, row in table}  # fmt: skip
        source = "the sheet's score column"
    elif results.suffix.lower() in (".jsonl", ".json"):
        model, source = _from_results(results), str(results)
    else:
        model, source = _from_csv(results, id_column), str(results)
    first = rater_cols[0]
    pairs = [
        Pair(cid, h, model.get(cid, _Model(None)).score, model.get(cid, _Model(None)).p,
             model.get(cid, _Model(None)).expected)
        for cid, h in zip(ids, human[first], strict=True)
    ]  # fmt: skip
    if not any(p.human is not None for p in pairs):
        raise InputError(f"no row has a {first}: fill the sheet in first", path=str(sheet))
    try:
        a = agree(pairs, scale=scale, seed=seed)
    except ValueError as exc:
        raise InputError(str(exc), path=str(sheet)) from None
    between = raters([(c, human[c]) for c in rater_cols], scale=scale, seed=seed)
    kappa = a.figures.get("kappa_quadratic")
    needed = labels_needed(kappa, ci_width) if kappa is not None else None
    return AgreeResult(first, a, between, needed, ci_width, sheet, source)


def parse_scale(text: str) -> tuple[int, int]:
    """`1-10` → (1, 10)."""
    try:
        lo, hi = (int(x) for x in text.split("-", 1))
    except ValueError:
        raise ConfigError(f"--scale {text!r}: write it as LOW-HIGH, e.g. 1-10") from None
    if hi <= lo:
        raise ConfigError(f"--scale {text!r}: HIGH must be above LOW")
    return lo, hi
