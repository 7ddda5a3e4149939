"""`python -m harness.api ...` runs `harness api ...`."""

from harness.api.cli import main

raise SystemExit(main())
