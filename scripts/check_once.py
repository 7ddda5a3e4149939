"""Check that a scores CSV holds every id of the input CSV exactly once, and nothing else.

    python scripts/check_once.py INPUT.csv SCORES.csv [--id-column id]

Prints one line with the counts; exits 1 when an id is missing, repeated or foreign.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("scores")
    parser.add_argument("--id-column", default="id")
    args = parser.parse_args()
    with open(args.input, newline="", encoding="utf-8") as fh:
        wanted = [row[args.id_column] for row in csv.DictReader(fh)]
    with open(args.scores, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    seen = Counter(row["custom_id"] for row in rows)
    missing = [i for i in wanted if i not in seen]
    repeated = [i for i, n in seen.items() if n > 1]
    foreign = sorted(set(seen) - set(wanted))
    statuses = Counter(row["status"] for row in rows)
    print(
        f"{args.scores}: {len(wanted)} input ids, {len(seen)} in the scores; missing "
        f"{len(missing)}, repeated {len(repeated)}, foreign {len(foreign)}; statuses "
        + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
    )
    return 1 if missing or repeated or foreign else 0


if __name__ == "__main__":
    sys.exit(main())
