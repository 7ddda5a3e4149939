"""`harness api` with test seams: `python tests/api_seamed.py [--hold-at N] [--finalize-delay S]
-- <harness api options>`.

The service reads no test hook from its environment; this launcher hands it the seams of
`harness.testing.seams` (hold each batch once N requests are done until its release file
appears; pause between writing a batch's output files and committing them) and then runs the
command line exactly as `python -m harness.api` does.
"""

from __future__ import annotations

import argparse
import sys

from harness.api.cli import main
from harness.testing.seams import ApiSeams


def run(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="api_seamed.py")
    parser.add_argument("--hold-at", type=int, default=None)
    parser.add_argument("--finalize-delay", type=float, default=0.0)
    args = parser.parse_args(argv[:split])
    seams = ApiSeams(hold=args.hold_at, finalize_delay_s=args.finalize_delay)
    return main(argv[split + 1 :], seams=seams)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
