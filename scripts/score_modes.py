"""Rows per second of `harness run` in logprobs mode ÷ decode mode, on the same rows, the two modes
alternating run by run (decode first in odd runs, logprobs first in even ones), and how often the
two give the same score.

    python scripts/score_modes.py tokens            # embedded server, token path (the default)
    python scripts/score_modes.py text              # embedded server, text path (Ollama's form)
    python scripts/score_modes.py serve             # `harness serve` through --backend openai
    python scripts/score_modes.py tokens --runs 3 --rows 200 --threads 1 --dir /tmp/modes

Each run is a fresh `harness run` (a fresh server) over the same generated rows; the figure of a
run is its own `completed req/s` (the summary line), the ratio is logprobs ÷ decode of the same
run, and the script prints each run, then the median and range of the ratios and of the
agreement, with the load average before and after each run (a shared machine: read the ratio,
not the rates).

Beside the run's own rate, each run's `warm` rate: rows after the first ÷ the time from the
first row's end to the last row's end (the results lines' `finished` stamps), i.e. without the
first row's cold prefill of the rubric, which both modes pay once and which weighs more in the
faster mode's shorter run; with the medians of those rows' latency, prefill and decode. And
each row whose scores differ, with the log-probabilities logprobs mode read for the two values'
first tokens (where greedy decoding chooses), so a near-tie shows as one.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HARNESS = [sys.executable, "-m", "harness"]


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def one(cfg: str, mode: str, rows: Path, out: Path, threads: int | None) -> float:
    """One `harness run`; returns its completed req/s."""
    args = [*HARNESS, "run", str(rows), "--score-mode", mode, "--output", str(out), "--new",
            "--no-progress"]  # fmt: skip
    server = None
    if cfg == "serve":
        cmd = [*HARNESS, "serve", "--model", "gemma3-270m", "--ctx", "8192", "--port", "18931"]
        if threads:
            cmd += ["--threads", str(threads)]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(240):
            if subprocess.run(["curl", "-sf", "http://127.0.0.1:18931/health"],
                              capture_output=True).returncode == 0:  # fmt: skip
                break
            time.sleep(0.5)
        args += ["--backend", "openai", "--base-url", "http://127.0.0.1:18931/v1"]
    else:
        args += ["--request-path", cfg] + (["--threads", str(threads)] if threads else [])
    try:
        done = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    m = re.search(r"\(([\d.]+) s, ([\d.]+) completed req/s\)", done.stdout)
    if done.returncode != 0 or m is None:
        raise SystemExit(f"harness run failed ({done.returncode}): {done.stderr[-2000:]}")
    return float(m.group(2))


def lines(results: Path) -> list[dict[str, Any]]:
    """The results lines' `harness` records, in the order their requests started."""
    return sorted((json.loads(line)["harness"] for line in results.open()),
                  key=lambda h: h["started"])  # fmt: skip


def warm(rows: list[dict[str, Any]]) -> float:
    """Rows/s after the first row: (rows - 1) ÷ (last `finished` - first `finished`)."""
    ends = sorted(h["finished"] for h in rows)
    return (len(ends) - 1) / (ends[-1] - ends[0])


def split(rows: list[dict[str, Any]]) -> str:
    """Medians over the rows after the first: a request's latency, the server's prefill
    (`prompt_ms`) and decode (`decode_ms`) time, and what is left (HTTP, parsing, queueing)."""
    rows = rows[1:]
    lat, pre, dec = (statistics.median(float(h[k] or 0) for h in rows)
                     for k in ("latency_ms", "prompt_ms", "decode_ms"))  # fmt: skip
    return f"latency {lat:.0f} ms: prefill {pre:.0f}, decode {dec:.0f}, rest {lat - pre - dec:.0f}"


def readings(results: Path) -> dict[str, dict[str, float]]:
    """Per row, the log-probabilities logprobs mode read at the value's first token (token
    text -> natural log)."""
    out = {}
    for line in results.open():
        r = json.loads(line)
        steps = (r["harness"].get("scoring") or {}).get("steps") or [{}]
        out[r["custom_id"]] = {str(t): float(lp) for t, lp in steps[0].get("top") or []}
    return out


def first_token(read: dict[str, float], value: str) -> str:
    """The value's first token among those read: the longest that starts its text."""
    return max((t for t in read if t and value.startswith(t)), key=len, default="?")


def scores(path: Path) -> dict[str, str]:
    with path.open(newline="") as fh:
        return {r["custom_id"]: r["score"] for r in csv.DictReader(fh)}


def main() -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("config", choices=["tokens", "text", "serve"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--threads", type=int, default=None, help="server threads (default: all)")
    p.add_argument("--dir", type=Path, default=Path("reports/score_modes"))
    a = p.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    rows = a.dir / f"rows{a.rows}.csv"  # named by --rows: another N is another file
    if not rows.exists():
        subprocess.run([*HARNESS, "generate", str(a.rows), str(rows)], check=True)
    ratios, warms, agree = [], [], []
    for run in range(1, a.runs + 1):
        order = ("logprobs", "decode") if run % 2 == 0 else ("decode", "logprobs")
        rps, hot = {}, {}
        for mode in order:
            before = load()
            out = a.dir / f"{a.config}_{run}_{mode}.csv"
            rps[mode] = one(a.config, mode, rows, out, a.threads)
            results = lines(out.with_name(out.stem + "_results.jsonl"))
            hot[mode] = warm(results)
            print(
                f"run {run} {mode}: {rps[mode]:.3f} rows/s, warm {hot[mode]:.3f} "
                f"(load {before} -> {load()}); warm medians: {split(results)}"
            )
        d = scores(a.dir / f"{a.config}_{run}_decode.csv")
        lp = scores(a.dir / f"{a.config}_{run}_logprobs.csv")
        read = readings(a.dir / f"{a.config}_{run}_logprobs_results.jsonl")
        differ = [k for k, v in d.items() if not v or lp.get(k) != v]
        same = 1 - len(differ) / len(d)
        ratios.append(rps["logprobs"] / rps["decode"])
        warms.append(hot["logprobs"] / hot["decode"])
        agree.append(same)
        print(
            f"run {run}: logprobs / decode {ratios[-1]:.3f} (warm {warms[-1]:.3f}), same score "
            f"on {same:.1%}"
        )
        for k in differ:
            top = read.get(k, {})
            t_dec, t_read = first_token(top, d[k]), first_token(top, str(lp.get(k)))
            print(
                f"  {k}: decoded {d[k]}, read {lp.get(k)}; their first tokens as read: "
                f"{t_dec} {top.get(t_dec, float('nan')):.3f}, "
                f"{t_read} {top.get(t_read, float('nan')):.3f}"
            )
    print(
        f"{a.config}: logprobs / decode median {statistics.median(ratios):.3f} (range "
        f"{min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)} runs); warm median "
        f"{statistics.median(warms):.3f} (range {min(warms):.3f}-{max(warms):.3f}); same score "
        f"median {statistics.median(agree):.1%} (range {min(agree):.1%}-{max(agree):.1%})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
