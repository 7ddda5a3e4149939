"""A batch job's files: which kind an input is, where its outputs go, reading and validating it
into work items (`load_input`: with `--on-bad-row skip` the bad rows are set aside for the
rejects file, `write_rejects`), and `harness convert` (a candidates CSV to an OpenAI Batch
JSONL). The scores CSV is `harness.scoresfile`'s. Everything is validated before any output is
created: a mistake raises `InputError` or `ConfigError` with the file, line or setting.
"""

from __future__ import annotations

import csv
import hashlib
import io
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import orjson

from harness.csvfile import CsvFile
from harness.errors import ConfigError, InputError
from harness.fileio import atomic_write_text
from harness.inputs import input_sha256
from harness.lock import hold, lock_path_for
from harness.run.options import DEFAULT_SEED, BatchOptions
from harness.scoresfile import (
    METRIC_COLUMNS,
    SCORE_COLUMNS,
    ScoreCounts,
    ScoresLayout,
    kept_columns,
    write_scores,
)
from harness.workload import (
    ON_BAD_ROW,
    CandidateTable,
    Rejected,
    WorkItem,
    batch_line,
    check_bad_rows,
    item_body,
    item_maker,
    items_from_batch,
    items_from_table,
    load_prompt,
    read_batch_lines,
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
    "rejects_path",
    "row_sha",
    "score_columns",
    "write_rejects",
    "write_scores",
]


BATCH_SUFFIXES = (".jsonl", ".json")
"""Input files with these suffixes are OpenAI Batch JSONL; anything else is a CSV."""

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
    items: Sequence[WorkItem]
    """A CSV's: `RowItems` (each built from the file when asked for); a batch file's: a tuple."""
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
    id_name: str = "custom_id"
    """The id column's name in the input (a batch JSONL's: `custom_id`): the scores CSV's."""
    kept: tuple[str, ...] = ()
    """Input columns the scores CSV carries over (`--keep-columns`)."""
    kept_values: tuple[tuple[str, ...], ...] = ()
    """Each item's values of `kept` (empty when none are kept)."""
    row_sha: tuple[str, ...] = ()
    """Each item's row identity (`row_sha`): resume compares it with the row that was scored."""
    ids: tuple[str, ...] = ()
    """Each item's id (without building the item); `scored_rows` and resume read it."""
    row_lines: tuple[int, ...] = ()
    """Each item's line in the input (where its row starts)."""
    rejected: tuple[Rejected, ...] = ()
    """Bad rows set aside (`--on-bad-row skip`), in file order."""

    def scored_rows(self) -> Iterator[tuple[str, Sequence[str]]]:
        """(id, kept values) of every item, in input order (what `write_scores` lays out)."""
        ids = self.ids or tuple(it.custom_id for it in self.items)
        for i, cid in enumerate(ids):
            yield cid, self.kept_values[i] if self.kept_values else ()


def row_sha(content: Any) -> str:
    """A row's identity: 16 hex digits of a BLAKE2b hash of its content (a CSV row's cells by
    column name, a batch line's body), key order ignored."""
    data = orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(data, digest_size=8).hexdigest()


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
        rejected=table.rejected,
    )


def load_input(options: BatchOptions) -> BatchInput:
    """Read and validate the input (and prompt file) into work items; raises InputError or
    ConfigError naming the file, line or setting. Creates nothing."""
    path = Path(options.input)
    kind = input_kind(path)
    if kind == "batch":
        return _load_batch(options, path)
    return _load_csv(options, path)


def _load_csv(options: BatchOptions, path: Path) -> BatchInput:
    """A CSV read in one streamed pass: per row only its offset, id, identity, line and kept
    values stay in memory; its work item is built again from the file when it is sent
    (`RowItems`)."""
    if options.on_bad_row not in ON_BAD_ROW:
        raise ConfigError(f"--on-bad-row {options.on_bad_row!r}: choose {' or '.join(ON_BAD_ROW)}")
    f = CsvFile(path, options.id_column)
    prompt = load_prompt(options.prompt)
    fields = _schema_fields([prompt.output_schema])
    kept = kept_columns(options.keep_columns, f.columns, f.id_column, fields)
    make = item_maker(
        prompt,
        f.columns,
        f.id_column,
        source=str(path),
        max_tokens=options.max_tokens or tokens_for_schema(prompt.output_schema),
        temperature=0.0,
        seed=options.seed,
        structured=options.structured,
    )
    offsets, lines = array("q"), array("q")
    ids: list[str] = []
    shas: list[str] = []
    values: list[tuple[str, ...]] = []
    bad: list[Rejected] = []
    for offset, line, row in f.rows(bad):
        offsets.append(offset)
        lines.append(line)
        ids.append(row[f.id_column])
        shas.append(row_sha(row))
        if kept:
            values.append(tuple(row[c] for c in kept))
    check_bad_rows(path, bad, len(ids), options.on_bad_row)
    total = len(ids)
    if options.sample is not None:
        keep = sample_rows(range(total), options.sample, options.seed)
        offsets = array("q", (offsets[i] for i in keep))
        lines = array("q", (lines[i] for i in keep))
        ids = [ids[i] for i in keep]
        shas = [shas[i] for i in keep]
        values = [values[i] for i in keep] if kept else values
    return BatchInput(
        path,
        "csv",
        RowItems(f, offsets, ids, shas, make),
        fields,
        total + len(bad),
        f"{prompt.name} ({prompt.path})",
        prompt.sha256,
        _input_digest(path),
        id_name=f.id_column,
        kept=kept,
        kept_values=tuple(values),
        row_sha=tuple(shas),
        row_lines=tuple(lines),
        rejected=tuple(bad),
        ids=tuple(ids),
    )


class RowItems(Sequence[WorkItem]):
    """The work items of a CSV's rows, built from the file when asked for: each row read again
    at its offset (the file opened for that row: nothing is held open between rows). A row
    whose id or content is not what was read first (the file was edited during the run)
    raises InputError naming it: what is sent is what the job was checked on."""

    def __init__(
        self,
        csvfile: CsvFile,
        offsets: array[int],
        ids: Sequence[str],
        shas: Sequence[str],
        make: Callable[[Mapping[str, str]], WorkItem],
    ) -> None:
        self._file = csvfile
        self._offsets = offsets
        self._ids = ids
        self._shas = shas
        self._make = make

    def __len__(self) -> int:
        return len(self._offsets)

    @overload
    def __getitem__(self, i: int) -> WorkItem: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[WorkItem]: ...

    def __getitem__(self, i: int | slice) -> WorkItem | Sequence[WorkItem]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        with self._file.open_cursor(self._offsets[i]) as cursor:
            row = cursor.next_row()
        cid = self._ids[i]
        if row is None or row.get(self._file.id_column) != cid or row_sha(row) != self._shas[i]:
            raise InputError(
                f"row {cid!r} is not what it was when the run read the file: the file changed "
                "during the run; stop editing it, then run the same command again (finished "
                "rows are kept)",
                path=str(self._file.path),
            )
        return self._make(row)

    def __iter__(self) -> Iterator[WorkItem]:
        for i in range(len(self)):
            yield self[i]


def _load_batch(options: BatchOptions, path: Path) -> BatchInput:
    if options.prompt is not None:
        raise ConfigError(
            f"--prompt applies to CSV input only; the lines of {path} carry their own messages"
        )
    if options.keep_columns:
        raise ConfigError(
            f"--keep-columns applies to CSV input only; {path} is a batch JSONL (its scores "
            "CSV has custom_id and the reply's fields)"
        )
    lines, bad = read_batch_lines(path)
    check_bad_rows(
        path, bad, len(lines), options.on_bad_row, what="line", empty="input has no batch lines"
    )
    chosen = sample_rows(lines, options.sample, options.seed)
    items = items_from_batch(chosen)
    fields = _schema_fields([it.output_schema for it in items])
    digest = hashlib.sha256(
        orjson.dumps([list(it.prefix) for it in items[:1]], option=orjson.OPT_SORT_KEYS)
    ).hexdigest()
    return BatchInput(
        path,
        "batch",
        tuple(items),
        fields,
        len(lines) + len(bad),
        "the batch lines' own messages",
        digest,
        _input_digest(path),
        row_sha=tuple(row_sha(obj["body"]) for obj in chosen),
        ids=tuple(it.custom_id for it in items),
        rejected=tuple(bad),
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


def score_columns(fields: Sequence[str], *, logprobs: bool = True) -> list[str]:
    """The scores CSV header for these output fields (a batch JSONL's: `custom_id` first)."""
    return ScoresLayout(fields=tuple(fields), logprobs=logprobs).header


def rejects_path(scores: Path) -> Path:
    """The rejects file beside a scores CSV: `<stem>_rejects.csv` (`x_scores.csv` →
    `x_rejects.csv`; `--output y.csv` → `y_rejects.csv`)."""
    stem = scores.stem.removesuffix("_scores")
    return scores.with_name(f"{stem}_rejects.csv")


def write_rejects(path: Path, id_name: str, rejected: Sequence[Rejected]) -> None:
    """The bad rows set aside by `--on-bad-row skip`: line, id, reason (atomically)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["line", id_name, "reason"])
    for r in rejected:
        w.writerow([r.line, r.id, r.reason])
    atomic_write_text(path, buf.getvalue())
