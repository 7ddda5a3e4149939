"""Peak memory of `harness run` per input row, against the in-process test double.

    python scripts/rss_rows.py DIR --rows 10000 50000 170000 [--row-bytes 2000]

For each size: writes a CSV of that many ~2 KB rows (`candidate_id,name,years,resume`, a
seeded résumé text), runs `harness run` on it in a child process against the in-process double
(its figures are a test double's: only the memory is measured here), then runs the same command
again (the resume: nothing left to send, the scores rebuilt from the results), and prints the
peak RSS of each (the child's `ru_maxrss`) with bytes per row, and the wall time. A JSON line
per size goes to DIR/rss_rows.jsonl.
"""

from __future__ import annotations

import argparse
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


def write_csv(path: Path, rows: int, row_bytes: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        fh.write("candidate_id,name,years,resume\n")
        for i in range(rows):
            words: list[str] = []
            size = 0
            while size < row_bytes:
                w = rng.choice(WORDS)
                words.append(w)
                size += len(w) + 1
            fh.write(f"K{i:07d},Name {i},{i % 25},{' '.join(words)}\n")


def run(folder: Path, csv_name: str) -> tuple[int, int, float]:
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
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=folder, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    kb = int(proc.stderr.rsplit("maxrss_kb", 1)[-1].split()[0])
    return proc.returncode, kb * 1024, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 50_000, 170_000])
    ap.add_argument("--row-bytes", type=int, default=2000)
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
        code, rss, wall = run(args.dir, name)
        rcode, rrss, rwall = run(args.dir, name)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
