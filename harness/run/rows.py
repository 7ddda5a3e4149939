"""Resume row by row: which rows of the input were scored as they are now.

Beside the results file, `<results stem>.rows.json` maps each id to the identity of the row it
was sent as (`batchfiles.row_sha`: a hash of its cells, or of a batch line's body), written when
a run starts. A resumed run compares it with the input as it is now (`check_rows`):

- ids new to the results are scored (rows appended to the CSV: the next day's candidates);
- finished ids whose row is unchanged are kept;
- finished ids no longer in the input are counted (their lines stay in the results file, out
  of the scores);
- a finished id whose row changed refuses the run, naming it, unless `--rescore-changed`: its
  lines then move to `<results stem>.replaced.jsonl` (`set_aside`) and it is scored again.

A results file without a rows file (written before the harness kept one) resumes by id as
before, and the banner says its rows were not checked; a finished id the rows file does not
name (finished by a run of that older format, then resumed with --sample) is counted as
unchecked and takes the input's identity from then on.

Memory: the map holds one id and 16 hex digits per row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from harness.errors import ConfigError, OutputError
from harness.fileio import atomic_writer

__all__ = [
    "RowCheck",
    "check_rows",
    "read_rows",
    "refuse_changed",
    "replaced_path",
    "rows_path",
    "set_aside",
    "write_rows",
]


def rows_path(results: Path) -> Path:
    """The row identities beside a results file: `<stem>.rows.json`."""
    return results.with_name(results.stem + ".rows.json")


def replaced_path(results: Path) -> Path:
    """Where `--rescore-changed` moves the earlier lines of rows scored again."""
    return results.with_name(results.stem + ".replaced.jsonl")


def read_rows(results: Path) -> dict[str, str] | None:
    """The recorded identities (None: no rows file)."""
    path = rows_path(results)
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable row identities ({exc}); use --new") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a map of row identities; use --new")
    return {str(k): str(v) for k, v in data.items()}


def write_rows(results: Path, rows: Mapping[str, str]) -> None:
    with atomic_writer(rows_path(results)) as fh:
        fh.write(orjson.dumps(rows))


@dataclass(slots=True)
class RowCheck:
    """What a resume found, row by row."""

    changed: list[tuple[str, int | None]] = field(default_factory=list)
    """Finished ids whose row changed since it was scored, with the row's line in the input."""
    removed: int = 0
    """Finished ids that are no longer rows of the input."""
    unchecked: int = 0
    """Finished ids with no recorded identity (not checked)."""
    old_format: bool = False
    """The results have no rows file at all (written before the harness kept one)."""
    rescored: bool = False
    """`changed` are scored again (--rescore-changed)."""
    rows: dict[str, str] = field(default_factory=dict)
    """The identities to record now: what each finished row was scored as, the input's for
    the others."""

    def notes(self) -> list[str]:
        """Banner lines."""
        out = []
        if self.old_format:
            out.append(
                "resume: these results predate row identities: resumed by id as before, rows "
                "edited since they were scored are not detected; from now on each row's "
                "identity is recorded"
            )
        elif self.unchecked:
            out.append(
                f"resume: {self.unchecked} finished rows had no recorded identity (not checked; "
                "recorded from the input now)"
            )
        if self.changed and self.rescored:
            out.append(
                f"resume: {len(self.changed)} rows changed since they were scored: scored again "
                "(--rescore-changed); their earlier lines are in the .replaced.jsonl file"
            )
        if self.removed:
            out.append(
                f"resume: {self.removed} rows scored earlier are no longer in the input (kept "
                "in the results file, left out of the scores)"
            )
        return out


CHANGED_LISTED = 10


def check_rows(
    results: Path,
    ids: Sequence[str],
    shas: Sequence[str],
    finished: Collection[str],
    *,
    lines: Sequence[int] = (),
    whole_input: bool = True,
    rescore: bool = False,
) -> RowCheck:
    """Compare the input's rows (`ids`, `shas`, aligned; `lines` their lines in the file) with
    what the finished ids were scored as. `whole_input`: the items are every row of the input
    (not a --sample): only then is a finished id missing from them a removed row. `rescore`:
    a changed row will be scored again (its identity recorded as it is now)."""
    old = read_rows(results)
    check = RowCheck(old_format=old is None and bool(finished), rescored=rescore)
    recorded = old or {}
    present: set[str] = set()
    for i, (cid, sha) in enumerate(zip(ids, shas, strict=True)):
        present.add(cid)
        was = recorded.get(cid)
        if cid in finished:
            if was is None:
                check.unchecked += not check.old_format
            elif was != sha:
                check.changed.append((cid, lines[i] if i < len(lines) else None))
                check.rows[cid] = sha if rescore else was
                continue
        check.rows[cid] = sha if cid not in finished or was is None else was
    for cid, was in recorded.items():
        if cid not in present and cid in finished:
            check.rows[cid] = was  # a removed row: if it comes back, it is compared
    if whole_input:
        check.removed = sum(1 for cid in finished if cid not in present)
    return check


def refuse_changed(results: Path, changed: Sequence[tuple[str, int | None]], path: Path) -> None:
    """Exit 2 naming the rows that changed under a finished id."""
    shown = ", ".join(
        f"{cid!r}" + (f" (line {line})" if line else "") for cid, line in changed[:CHANGED_LISTED]
    )
    more = f" and {len(changed) - CHANGED_LISTED} more" if len(changed) > CHANGED_LISTED else ""
    raise ConfigError(
        f"{path}: {len(changed)} row(s) changed since they were scored into {results}: "
        f"{shown}{more}; restore them, or run with --rescore-changed to score them again (their "
        "earlier results move to " + replaced_path(results).name + ")"
    )


def set_aside(results: Path, ids: Collection[str]) -> int:
    """Move every line of `ids` out of the results file (appended to
    `<stem>.replaced.jsonl`), the file replaced atomically; returns the lines moved."""
    wanted = set(ids)
    moved = 0
    try:
        with (
            results.open("rb") as src,
            replaced_path(results).open("ab") as aside,
            atomic_writer(results) as out,
        ):
            for raw in src:
                if raw.endswith(b"\n") and raw.strip():
                    obj = None
                    with contextlib.suppress(orjson.JSONDecodeError):
                        obj = orjson.loads(raw)
                    if isinstance(obj, dict) and obj.get("custom_id") in wanted:
                        aside.write(raw)
                        moved += 1
                        continue
                out.write(raw)
            aside.flush()
    except OSError as exc:
        raise OutputError(f"cannot rewrite {results}: {exc.strerror or exc}") from None
    return moved
