"""Check that a run's results hold every id of the input exactly once, and nothing else.

    python scripts/check_once.py INPUT.csv RESULTS.jsonl [--id-column id]

Reads the results JSONL (not the scores CSV, which keeps one row per id whatever happened): an
id may appear again only after an error line (a --retry-failed retry, whose line is final).
Prints one line with the counts; exits 1 when an id is missing, repeated or foreign.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter


def main() -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("input")
    parser.add_argument("results")
    parser.add_argument("--id-column", default="id")
    args = parser.parse_args()
    with open(args.input, newline="", encoding="utf-8") as fh:
        wanted = [row[args.id_column] for row in csv.DictReader(fh)]
    final: dict[str, bool] = {}
    repeated: list[str] = []
    with open(args.results, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            cid, ok = rec["custom_id"], rec.get("error") is None
            if final.get(cid) is True:
                repeated.append(cid)  # a line after a success: a duplicate
            final[cid] = ok
    missing = [i for i in wanted if i not in final]
    foreign = sorted(set(final) - set(wanted))
    statuses = Counter("ok" if ok else "error" for ok in final.values())
    print(
        f"{args.results}: {len(wanted)} input ids, {len(final)} in the results; missing "
        f"{len(missing)}, repeated {len(repeated)}, foreign {len(foreign)}; final statuses "
        + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
    )
    return 1 if missing or repeated or foreign else 0


if __name__ == "__main__":
    sys.exit(main())
