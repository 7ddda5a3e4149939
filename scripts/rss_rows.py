"""Peak memory of `harness run` per input row, against the in-process test double.

    python scripts/rss_rows.py DIR --rows 10000 50000 170000 [--row-bytes 2000]

For each size: writes a CSV of that many ~2 KB rows (`candidate_id,name,years,resume`, a
seeded résumé text), runs `harness run` on it in a child process against the in-process double
(its figures are a test double's: only the memory is measured here), then runs the same command
again (the resume: nothing left to send, the scores rebuilt from the results), and prints the
peak RSS of each (the child's `ru_maxrss`) with bytes per row, and the wall time. A JSON line
per size goes to DIR/rss_rows.jsonl. With `--bad 1000`, then: the largest size again with that
many bad rows scattered (refused in one error; then `--on-bad-row skip`: the good rows scored,
the bad ones in the rejects file), and `--append` rows appended to its CSV (only they run).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import resource, sys
from harness.cli import main
from harness.run import execute
from harness.testing import InProcessDouble
execute.open_backend = lambda cfg: InProcessDouble()
code = main(sys.argv[1:])
print("maxrss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""

PROMPT = """\
name: rss-rubric
system: Score the candidate from 1 to 10 for a senior data engineer role. Reply as JSON.
user_template: |
  Name: {name}
  Years: {years}
  Resume: {resume}
output_schema:
  type: object
  properties:
    score: {type: integer, minimum: 1, maximum: 10}
  required: [score]
"""

WORDS = [
    "built",
    "pipelines",
    "spark",
    "kafka",
    "airflow",
    "python",
    "sql",
    "led",
    "team",
    "migrated",
    "warehouse",
    "snowflake",
    "reduced",
    "cost",
    "latency",
    "designed",
    "streaming",
    "platform",
    "mentored",
    "engineers",
    "on-call",
    "reliability",
]


def write_csv(
    path: Path, rows: int, row_bytes: int, seed: int = 7, *, start: int = 0, bad: int = 0
) -> set[int]:
    """`rows` rows from id `start` (appended when `start` > 0); `bad` of them, at seeded random
    places, have two fields instead of four. Returns the indexes of the bad ones."""
    rng = random.Random(seed + start)
    broken = set(rng.sample(range(rows), bad)) if bad else set()
    with path.open("a" if start else "w", encoding="utf-8") as fh:
        if not start:
            fh.write("candidate_id,name,years,resume\n")
        for i in range(start, start + rows):
            if i - start in broken:
                fh.write(f"K{i:07d},a bad row\n")
                continue
            words: list[str] = []
            size = 0
            while size < row_bytes:
                w = rng.choice(WORDS)
                words.append(w)
                size += len(w) + 1
            fh.write(f"K{i:07d},Name {i},{i % 25},{' '.join(words)}\n")
    return broken


def run(folder: Path, csv_name: str, *extra: str) -> tuple[int, int, float, str]:
    argv = [
        sys.executable,
        "child.py",
        "run",
        csv_name,
        "--no-progress",
        "--prompt",
        "rubric.yaml",
        "--id-column",
        "candidate_id",
        "--keep-columns",
        "name,years",
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=folder, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    kb = int(proc.stderr.rsplit("maxrss_kb", 1)[-1].split()[0])
    return proc.returncode, kb * 1024, wall, proc.stdout + proc.stderr


def in_order(scores: Path, ids: list[str]) -> bool:
    """The scores CSV: its header starts with the id column and the kept columns, and its rows
    are `ids`, in that order."""
    with scores.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        head = next(reader)
        got = [row[0] for row in reader]
    return head[:4] == ["candidate_id", "name", "years", "score"] and got == ids


def acceptance(folder: Path, n: int, row_bytes: int, bad: int, append: int) -> None:
    """Bad rows (refused, then skipped), then rows appended to the finished run's CSV."""
    name = f"bad{n}.csv"
    for old in folder.glob(f"bad{n}*"):
        old.unlink()
    broken = write_csv(folder / name, n, row_bytes, bad=bad)
    code, _, wall, out = run(folder, name)
    listed = out.count(f"{name}:") - 1
    total = next((ln.strip() for ln in out.splitlines() if "bad rows in all" in ln), "")
    total += " / " + next((ln.strip() for ln in out.splitlines() if "more not listed" in ln), "")
    total = next((ln.strip() for ln in out.splitlines() if "bad rows in all" in ln), "")
    total += " / " + next((ln.strip() for ln in out.splitlines() if "more not listed" in ln), "")
    print(
        f"{n} rows, {bad} bad: default exit {code} in {wall:.0f} s; the error lists the "
        f"first and {listed} more; says: {total!r}"
    )
    code, rss, wall, out = run(folder, name, "--on-bad-row", "skip")
    with (folder / f"bad{n}_rejects.csv").open(newline="", encoding="utf-8") as fh:
        rejects = list(csv.DictReader(fh))
    good = [f"K{i:07d}" for i in range(n) if i not in broken]
    ordered = in_order(folder / f"bad{n}_scores.csv", good)
    print(
        f"--on-bad-row skip: exit {code} in {wall:.0f} s, peak RSS {rss / 2**20:.0f} MiB; "
        f"scores in input order with the kept columns: {ordered} "
        f"({len(good)} rows); rejects file: {len(rejects)} rows, ids match: "
        f"{sorted(r['candidate_id'] for r in rejects) == sorted(f'K{i:07d}' for i in broken)}"
    )
    before = (folder / f"bad{n}_results.jsonl").read_bytes().count(b"\n")
    write_csv(folder / name, append, row_bytes, start=n)
    code, rss, wall, out = run(folder, name, "--on-bad-row", "skip")
    sent = (folder / f"bad{n}_results.jsonl").read_bytes().count(b"\n") - before
    good += [f"K{i:07d}" for i in range(n, n + append)]
    print(
        f"{append} rows appended: exit {code} in {wall:.0f} s, peak RSS {rss / 2**20:.0f} "
        f"MiB, {sent} requests sent; scores in input order: "
        f"{in_order(folder / f'bad{n}_scores.csv', good)} ({len(good)} rows)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 50_000, 170_000])
    ap.add_argument("--row-bytes", type=int, default=2000)
    ap.add_argument(
        "--bad",
        type=int,
        default=0,
        help="then: the largest size with this many bad rows (refused, then --on-bad-row skip)",
    )
    ap.add_argument("--append", type=int, default=1000, help="rows appended after --bad's run")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    (args.dir / "child.py").write_text(CHILD, encoding="utf-8")
    (args.dir / "rubric.yaml").write_text(PROMPT, encoding="utf-8")
    for n in args.rows:
        name = f"c{n}.csv"
        for old in args.dir.glob(f"c{n}_*"):
            old.unlink()
        write_csv(args.dir / name, n, args.row_bytes)
        size = (args.dir / name).stat().st_size
        code, rss, wall, _ = run(args.dir, name)
        rcode, rrss, rwall, _ = run(args.dir, name)
        line = {
            "rows": n,
            "csv_bytes": size,
            "run": {"exit": code, "peak_rss": rss, "per_row": rss / n, "wall_s": round(wall, 1)},
            "resume": {
                "exit": rcode,
                "peak_rss": rrss,
                "per_row": rrss / n,
                "wall_s": round(rwall, 1),
            },
            "source": "ru_maxrss of the child process; server: in-process test double",
        }
        print(
            f"{n:>7} rows ({size / 1e6:.0f} MB): run exit {code}, peak RSS {rss / 2**20:.0f} MiB "
            f"({rss / n:,.0f} B/row), {wall:.0f} s; resume exit {rcode}, peak RSS "
            f"{rrss / 2**20:.0f} MiB ({rrss / n:,.0f} B/row), {rwall:.0f} s",
            flush=True,
        )
        with (args.dir / "rss_rows.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        ids = [f"K{i:07d}" for i in range(n)]
        ordered = in_order(args.dir / f"c{n}_scores.csv", ids)
        print(f"   scores in input order with the kept columns: {ordered}")
    if args.bad:
        acceptance(args.dir, max(args.rows), args.row_bytes, args.bad, args.append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
