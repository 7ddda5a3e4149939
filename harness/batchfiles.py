"""A batch job's files: which kind an input is, where its outputs go, reading and validating it
into work items (`load_input`), `harness convert` (a candidates CSV to an OpenAI Batch JSONL)
and the scores CSV written from the results file:

    custom_id, score, <other output-schema fields>, score_expected, score_p, status, error,
    prompt_tokens, cached_tokens, completion_tokens, latency_ms

(`score_expected` and `score_p` with `--score-mode logprobs`: `harness.scoring`), one row per
input row, in input order (rows not run yet are absent). Everything is validated before any
output is created: a mistake raises `InputError` or `ConfigError` with the file, line or setting.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from harness.engine import read_results
from harness.errors import ConfigError, InputError
from harness.fileio import atomic_write_text
from harness.inputs import input_sha256
from harness.lock import hold, lock_path_for
from harness.run.options import DEFAULT_SEED, BatchOptions
from harness.workload import (
    CandidateTable,
    WorkItem,
    batch_line,
    item_body,
    items_from_batch,
    items_from_table,
    load_prompt,
    parse_reply,
    read_batch_jsonl,
    read_candidates_csv,
    sample_rows,
    tokens_for_schema,
)

__all__ = [
    "BATCH_SUFFIXES",
    "METRIC_COLUMNS",
    "SCORE_COLUMNS",
    "BatchInput",
    "ConvertResult",
    "InputKind",
    "ScoreCounts",
    "convert",
    "input_kind",
    "load_input",
    "output_paths",
    "score_columns",
    "write_scores",
]


BATCH_SUFFIXES = (".jsonl", ".json")
"""Input files with these suffixes are OpenAI Batch JSONL; anything else is a CSV."""

METRIC_COLUMNS = (
    "status",
    "error",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "latency_ms",
)
"""The scores CSV's columns after `custom_id`, `score`, the other output-schema fields and
`SCORE_COLUMNS`."""

SCORE_COLUMNS = ("score_expected", "score_p")
"""`--score-mode logprobs`: the expected score (sum of p·value over the allowed values) and the
probability of `score`, from the model's probabilities; empty for rows the model decoded."""

InputKind = Literal["csv", "batch"]


def input_kind(path: str | Path) -> InputKind:
    """`batch` for a `.jsonl` / `.json` file, else `csv`."""
    return "batch" if Path(path).suffix.lower() in BATCH_SUFFIXES else "csv"


def output_paths(input_path: str | Path, output: str | Path | None = None) -> tuple[Path, Path]:
    """(scores CSV, results JSONL) of a run: `<stem>_scores.csv` and `<stem>_results.jsonl`
    next to the input, or `output` and `<outstem>_results.jsonl` next to it."""
    src = Path(input_path)
    if output is None:
        scores = src.with_name(f"{src.stem}_scores.csv")
        results = src.with_name(f"{src.stem}_results.jsonl")
    else:
        scores = Path(output)
        results = scores.with_name(f"{scores.stem}_results.jsonl")
    for what, path in (("scores CSV", scores), ("results file", results)):
        if _same_path(path, src):
            raise ConfigError(
                f"the {what} would be the input file itself ({src}); choose another --output"
            )
    if scores.is_dir():
        raise ConfigError(f"--output {scores} is a directory; give a file name such as x.csv")
    return scores, results


def _same_path(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


@dataclass(frozen=True, slots=True)
class BatchInput:
    """A validated input: its work items (input order) and the output fields to report."""

    path: Path
    kind: InputKind
    items: tuple[WorkItem, ...]
    fields: tuple[str, ...]
    """Output-schema fields for the scores CSV, `score` first (empty when there is none)."""
    rows: int
    """Rows (CSV) or lines (batch) in the file, before --sample."""
    prompt: str = ""
    """The prompt that scores: its name and file (CSV), or `the batch lines' own messages`."""
    prompt_sha256: str = ""
    """Hash of the prompt (CSV: system, template, schema; batch: the first line's messages)."""
    input_sha256: str = ""
    """Hash of the whole input file (`harness.inputs.input_sha256`): every row, every line."""


def _schema_fields(schemas: Sequence[Mapping[str, Any] | None]) -> tuple[str, ...]:
    names: list[str] = ["score"]
    for schema in schemas:
        props = schema.get("properties") if schema else None
        if isinstance(props, Mapping):
            names.extend(str(k) for k in props if str(k) not in names)
    return tuple(names)


def _sample_table(table: CandidateTable, n: int | None, seed: int) -> CandidateTable:
    keep = sample_rows(range(len(table.rows)), n, seed)
    return CandidateTable(
        table.path,
        table.columns,
        table.id_column,
        tuple(table.rows[i] for i in keep),
        tuple(table.lines[i] for i in keep),
    )


def load_input(options: BatchOptions) -> BatchInput:
    """Read and validate the input (and prompt file) into work items; raises InputError or
    ConfigError naming the file, line or setting. Creates nothing."""
    path = Path(options.input)
    kind = input_kind(path)
    if kind == "batch":
        if options.prompt is not None:
            raise ConfigError(
                f"--prompt applies to CSV input only; the lines of {path} carry their own messages"
            )
        lines = read_batch_jsonl(path)
        chosen = sample_rows(lines, options.sample, options.seed)
        items = items_from_batch(chosen)
        fields = _schema_fields([it.output_schema for it in items])
        digest = hashlib.sha256(
            orjson.dumps([list(it.prefix) for it in items[:1]], option=orjson.OPT_SORT_KEYS)
        ).hexdigest()
        return BatchInput(
            path,
            kind,
            tuple(items),
            fields,
            len(lines),
            "the batch lines' own messages",
            digest,
            _input_digest(path),
        )
    table = read_candidates_csv(path, options.id_column)
    prompt = load_prompt(options.prompt)
    sampled = _sample_table(table, options.sample, options.seed)
    items = items_from_table(
        sampled,
        prompt,
        max_tokens=options.max_tokens or tokens_for_schema(prompt.output_schema),
        temperature=0.0,
        seed=options.seed,
        structured=options.structured,
    )
    return BatchInput(
        path,
        kind,
        tuple(items),
        _schema_fields([prompt.output_schema]),
        len(table.rows),
        f"{prompt.name} ({prompt.path})",
        prompt.sha256,
        _input_digest(path),
    )


def _input_digest(path: Path) -> str:
    try:
        return input_sha256(path)
    except OSError as exc:  # it was just read: gone or unreadable since
        raise InputError(f"cannot read it again: {exc.strerror or exc}", path=str(path)) from None


@dataclass(frozen=True, slots=True)
class ConvertResult:
    input: Path
    output: Path
    lines: int
    rows: int
    """Rows in the CSV (before --sample)."""
    prompt: str


def convert(
    input_path: str | Path,
    output_path: str | Path,
    *,
    id_column: str = "id",
    prompt: str | Path | None = None,
    sample: int | None = None,
    seed: int = DEFAULT_SEED,
    max_tokens: int | None = None,
    model: str | None = None,
) -> ConvertResult:
    """Write one OpenAI Batch line per CSV row (atomically, under `<output>.lock`: a second
    writer of the same file is refused, naming the first); validates everything first."""
    src, dst = Path(input_path), Path(output_path)
    if input_kind(src) != "csv":
        raise ConfigError(f"convert reads a candidates CSV; {src} is already a batch JSONL")
    if _same_path(src, dst):
        raise ConfigError(f"the output {dst} is the input file itself; choose another name")
    if dst.is_dir():
        raise ConfigError(f"the output {dst} is a directory; give a file name such as x.jsonl")
    if sample is not None and sample < 1:
        raise ConfigError(f"--sample {sample} must be at least 1 (or leave it out)")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"--max-tokens {max_tokens} must be at least 1")
    table = read_candidates_csv(src, id_column)
    spec = load_prompt(prompt)
    max_tokens = max_tokens or tokens_for_schema(spec.output_schema)
    sampled = _sample_table(table, sample, seed)
    # `schema`: the body carries response_format; items_from_batch turns it back into the
    # tight grammar, so a converted file runs exactly like the CSV with --structured grammar.
    items = items_from_table(
        sampled, spec, max_tokens=max_tokens, temperature=0.0, seed=seed, structured="schema"
    )
    out = bytearray()
    for item in items:
        body = item_body(item)
        if model:
            body = {"model": model, **body}  # OpenAI's Batch API requires body.model
        out += orjson.dumps(batch_line(item.custom_id, body))
        out += b"\n"
    with hold(lock_path_for(dst), what=f"the batch file {dst}"):
        atomic_write_text(dst, out.decode("utf-8"))
    return ConvertResult(src, dst, len(items), len(table.rows), spec.path or spec.name)


def score_columns(fields: Sequence[str]) -> list[str]:
    """The scores CSV header for these output fields."""
    return ["custom_id", *(fields or ("score",)), *SCORE_COLUMNS, *METRIC_COLUMNS]


def _reply_object(harness: Mapping[str, Any]) -> Mapping[str, Any] | None:
    parsed = harness.get("parsed")
    if isinstance(parsed, Mapping):
        return parsed
    content = harness.get("content")
    if not isinstance(content, str) or not content.strip():
        return None
    try:
        return parse_reply(content, None)
    except ValueError:
        return None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    return orjson.dumps(value).decode("utf-8")


def _rounded(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def _score_of(obj: Mapping[str, Any] | None) -> int | None:
    value = obj.get("score") if obj is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(slots=True)
class ScoreCounts:
    done: int = 0
    failed: int = 0
    scored: int = 0
    foreign: int = 0
    """Results lines whose custom_id is not in this input."""


def write_scores(
    ids: Sequence[str], fields: Sequence[str], results: Path, scores: Path
) -> ScoreCounts:
    # Streamed: each results line becomes its CSV line at once, and only that short text is
    # kept per id (a 170,000-line results file holds every reply body; the CSV lines do not).
    wanted = set(ids)
    columns = score_columns(fields)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    counts = ScoreCounts()
    rows: dict[str, str] = {}
    final: dict[str, tuple[bool, bool]] = {}
    for line in read_results(results):
        cid = line.get("custom_id")
        if cid not in wanted:
            counts.foreign += 1
            continue
        h: Mapping[str, Any] = line.get("harness") or {}
        err = line.get("error")
        ok = err is None
        obj = _reply_object(h) if ok else None
        score = _score_of(obj)
        final[cid] = (ok, score is not None)  # a retried row: its last line is final
        message = ""
        if isinstance(err, Mapping):
            message = f"{err.get('code') or 'Error'}: {err.get('message') or ''}"
        values = {
            "custom_id": cid,
            "score": score,
            "status": "ok" if ok else "error",
            "error": message,
            "prompt_tokens": h.get("prompt_tokens"),
            "cached_tokens": h.get("cached_tokens"),
            "completion_tokens": h.get("completion_tokens"),
            "latency_ms": h.get("latency_ms"),
        }
        for name in fields:
            if name != "score":
                values[name] = obj.get(name) if obj is not None else None
        scoring = h.get("scoring")
        if ok and isinstance(scoring, Mapping) and scoring.get("mode") == "logprobs":
            values["score_expected"] = _rounded(scoring.get("expected"))
            values["score_p"] = _rounded(scoring.get("p"))
        writer.writerow([_cell(values.get(c)) for c in columns])
        rows[cid] = buf.getvalue()
        buf.seek(0)
        buf.truncate()
    for ok, scored in final.values():
        counts.done += ok
        counts.failed += not ok
        counts.scored += scored
    writer.writerow(columns)
    header = buf.getvalue()
    atomic_write_text(scores, header + "".join(rows[cid] for cid in ids if cid in rows))
    return counts
