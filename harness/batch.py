"""The production batch tool behind `harness convert` and `harness run`.

`convert` turns a candidates CSV into an OpenAI Batch input file (one chat request per row,
carrying the shared rubric, the row's rendered message, the generation parameters and the
output schema). `run` sends a CSV or a batch JSONL through the engine (`run_job`), keeps every
finished request in an append-only results file (the OpenAI Batch output format plus a
`harness` object; running the same command again resumes from it, skipping every id already
there, errors included), and at the end of every run, also after Ctrl-C, SIGTERM or a server
failure, writes a scores CSV from that file atomically:

    custom_id, score, <other output-schema fields>, score_expected, score_p, status, error,
    prompt_tokens, cached_tokens, completion_tokens, latency_ms

(`score_expected` and `score_p` with `--score-mode logprobs`: `harness.scoring`)

one row per input row, in input order (rows not run yet are absent).

Everything the user gave (input file, prompt file, template placeholders, backend, strategy,
numbers) is validated before any output is created or any server is started: a mistake raises
`InputError` or `ConfigError` with the file, line or setting and what to do.

Python API::

    options = BatchOptions(Path("candidates.csv"), model="tiny-gemma3")
    result = run_batch(options)            # or: await run_batch_async(options)
    print(result.summary())

`run_batch(..., backend=...)` runs on a backend the caller built (tests use the in-process
double); otherwise `make_backend(options)` builds the one the options name. Ctrl-C and SIGTERM
stop a `run_batch` cleanly (the embedded server too); SIGKILL cannot be caught, and leaves the
embedded server (a child in its own session) running.

This module is the facade of that Python API; the job itself lives in `harness.run` (options,
settings, the backend factory, the preflight, the executors, the result) and its files in
`harness.batchfiles` (input, convert, the scores CSV).
"""

from __future__ import annotations

from harness.backends.base import Backend
from harness.batchfiles import (
    BATCH_SUFFIXES,
    METRIC_COLUMNS,
    SCORE_COLUMNS,
    BatchInput,
    ConvertResult,
    InputKind,
    convert,
    input_kind,
    load_input,
    output_paths,
    score_columns,
)
from harness.run.execute import run_batch, run_batch_async
from harness.run.factory import open_backend
from harness.run.options import BACKENDS, DEFAULT_SEED, EXECUTORS, BatchOptions, batch_config
from harness.run.preflight import job_spec
from harness.run.result import BatchResult

__all__ = [
    "BACKENDS",
    "BATCH_SUFFIXES",
    "DEFAULT_SEED",
    "EXECUTORS",
    "METRIC_COLUMNS",
    "SCORE_COLUMNS",
    "BatchInput",
    "BatchOptions",
    "BatchResult",
    "ConvertResult",
    "InputKind",
    "batch_config",
    "convert",
    "input_kind",
    "job_spec",
    "load_input",
    "make_backend",
    "output_paths",
    "run_batch",
    "run_batch_async",
    "score_columns",
]


def make_backend(options: BatchOptions) -> Backend:
    """The backend the options name (not started): one server, or a pool over several
    (`--servers N`, several `--base-url`), built by `harness.run.factory.open_backend` from
    the options' settings (`batch_config`)."""
    return open_backend(batch_config(options))
