"""Write the JSON Schema of every report model (harness.reportmodels) to reports/schema/.

    python scripts/export_schemas.py

Run it after changing a report's shape, and commit the diff (tests/test_report_schemas.py
compares the committed files with the models).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.reportmodels import export_schemas

if __name__ == "__main__":
    for path in export_schemas(Path(__file__).resolve().parent.parent / "reports" / "schema"):
        print(path)
