"""Write a job shaped like a real user's: a candidates CSV and a rubric of its own.

    python scripts/user_job.py OUT_DIR [--rows 2000] [--seed 1]

`OUT_DIR/cands.csv` has the columns `candidate_id,resume_text,years` (a résumé of 1-3 KB of
text per row, as real CVs are, several times the ~100-token rows `harness generate` writes) and
`OUT_DIR/rubric.yaml` a rubric whose template shows every column (`{columns}`), so the same
rubric also scores generated rows: the scale phase on this CSV and on generated rows, with this
rubric, differ only in the rows (docs/measurements.md).
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

SKILLS = (
    "Spark", "Kafka", "Airflow", "dbt", "Snowflake", "BigQuery", "Flink", "Terraform",
    "Kubernetes", "PostgreSQL", "Python", "Scala", "Go", "Java", "SQL", "Redshift", "Delta Lake",
    "Iceberg", "Trino", "Looker", "Databricks", "AWS Glue", "Pub/Sub", "Dagster", "Prefect",
)  # fmt: skip
VERBS = (
    "built", "designed", "migrated", "maintained", "scaled", "owned", "led", "rewrote",
    "automated", "monitored", "optimised", "documented", "operated", "tested", "shipped",
)  # fmt: skip
THINGS = (
    "a streaming ingestion pipeline", "the batch ETL layer", "a feature store",
    "the data warehouse", "CDC from the order database", "the event tracking schema",
    "a data quality framework", "cost dashboards", "the lakehouse tables",
    "an internal metrics API", "backfills for five years of logs", "the on-call runbooks",
)  # fmt: skip
OUTCOMES = (
    "cutting latency from hours to minutes", "saving 30% of compute cost",
    "for 40 analysts", "with zero data loss during the cut-over", "across three regions",
    "serving 2 TB a day", "used by the finance team for month-end close",
    "replacing a fragile cron setup", "with automated alerting on freshness",
)  # fmt: skip

RUBRIC_SYSTEM = """\
You screen candidates for a Senior Data Platform Engineer at a retail analytics company.
Read the candidate's résumé and years of experience, then give one integer score from 1 to 10.

What the role needs, most important first:
1. Production data pipelines: batch and streaming ingestion that others depend on, with
   ownership of reliability (on-call, monitoring, backfills, incident follow-up).
2. Warehouse and lakehouse design: modelling for analytics, partitioning, table formats,
   cost control, and migrations between systems without data loss.
3. Orchestration and infrastructure as code: Airflow, Dagster or Prefect; Terraform;
   containers and Kubernetes for data services.
4. Data quality: tests on data, contracts with producers, freshness and volume alerts.
5. Working with analysts and finance: definitions of metrics, documentation, enablement.

How to score:
- 9-10: several years owning production pipelines and a warehouse end to end, with measured
  outcomes (cost, latency, reliability) and leadership of migrations or platform work.
- 7-8: solid hands-on pipeline and warehouse work with clear outcomes; less ownership or
  breadth than the top band.
- 5-6: relevant tools and some production work, but outcomes are vague or the experience is
  mostly adjacent (BI, application backend with some data work).
- 3-4: little production data engineering; mostly coursework, analysis or unrelated roles.
- 1-2: nothing relevant to the role.

Rules:
- Score only what the résumé shows. Do not reward keyword lists without outcomes.
- Years of experience alone never raise a score by more than one band.
- Ignore the candidate's name, gender, age, nationality, location and school prestige.
- Reply with JSON only: {"score": N} where N is an integer from 1 to 10.
"""

SCHEMA_YAML = """\
output_schema:
  type: object
  properties:
    score:
      type: integer
      minimum: 1
      maximum: 10
  required: [score]
  additionalProperties: false
"""


def resume(rng: random.Random, years: int) -> str:
    """A résumé of 1-3 KB: jobs, each a few sentences of what was done and with what."""
    target = rng.randint(1000, 3000)
    parts = [f"Data engineer with {years} years of experience."]
    while sum(len(p) + 1 for p in parts) < target:
        skills = ", ".join(rng.sample(SKILLS, 3))
        parts.append(
            f"{rng.choice(VERBS).capitalize()} {rng.choice(THINGS)} with {skills}, "
            f"{rng.choice(OUTCOMES)}."
        )
    text = " ".join(parts)
    return text[: text.rfind(".", 0, 3000) + 1] if len(text) > 3000 else text


def main() -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to write cands.csv and rubric.yaml into")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "cands.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["candidate_id", "resume_text", "years"])
        for i in range(args.rows):
            years = rng.randint(0, 15)
            w.writerow([f"CAND-{i + 1:06d}", resume(rng, years), years])
    system = "\n".join("  " + line if line else "" for line in RUBRIC_SYSTEM.splitlines())
    (args.out / "rubric.yaml").write_text(
        f"name: data-platform-rubric-v1\nsystem: |\n{system}\nuser_template: |\n  {{columns}}\n"
        + SCHEMA_YAML,
        encoding="utf-8",
    )
    print(f"{args.out / 'cands.csv'}: {args.rows} rows; {args.out / 'rubric.yaml'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
