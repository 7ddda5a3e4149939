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
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import orjson

from harness.backends.base import Backend
from harness.backends.openai import REQUEST_PATHS
from harness.backends.pool import PoolBackend
from harness.backends.server import SERVER_FLAGS
from harness.config import DEFAULT_CONFIG_PATH, load_profile
from harness.engine import JobSpec, RunnerConfig, TokenCounter, read_results, run_job
from harness.engine.job import endpoint_report, open_token_counter
from harness.engine.lengths import PromptLengths, check_fits, measure_lengths
from harness.engine.progress import format_duration
from harness.engine.reusewatch import ReuseWatchConfig
from harness.engine.store import read_final
from harness.engine.strategies import STRATEGIES
from harness.errors import ConfigError, InputError, OutputError
from harness.fileio import atomic_write_json, atomic_write_text
from harness.inputs import input_sha256
from harness.lock import hold, lock_path_for
from harness.metrics import MetricsCollector
from harness.models.registry import DEFAULT_MODEL, KNOWN_MODELS, resolve_model
from harness.records import RequestRecord
from harness.reportfiles import find_report
from harness.runconfig import RunConfig, Value, resolve_run_config
from harness.scoremode import choose_score_mode
from harness.scoring import SCORE_MODES
from harness.workload import (
    STRUCTURED_MODES,
    CandidateTable,
    WorkItem,
    batch_line,
    item_body,
    items_from_batch,
    items_from_table,
    load_prompt,
    parse_reply,
    read_batch_jsonl,
    read_candidates_csv,
    sample_rows,
    tokens_for_schema,
)

__all__ = [
    "BACKENDS",
    "BATCH_SUFFIXES",
    "METRIC_COLUMNS",
    "SCORE_COLUMNS",
    "BatchInput",
    "BatchOptions",
    "BatchResult",
    "ConvertResult",
    "convert",
    "input_kind",
    "job_spec",
    "load_input",
    "make_backend",
    "output_paths",
    "run_batch",
    "run_batch_async",
    "score_columns",
    "write_scores_csv",
]

BACKENDS = ("embedded", "openai", "ollama")
"""Backends `harness run` can use."""
EXECUTORS = ("local", "ray")
"""Who runs the engine: this process, or a Ray Data pipeline (`harness.rayexec`)."""
BATCH_SUFFIXES = (".jsonl", ".json")
"""Input files with these suffixes are OpenAI Batch JSONL; anything else is a CSV."""
METRIC_COLUMNS = (
    "status",
    "error",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "latency_ms",
)
"""The scores CSV's columns after `custom_id`, `score`, the other output-schema fields and
`SCORE_COLUMNS`."""
SCORE_COLUMNS = ("score_expected", "score_p")
"""`--score-mode logprobs`: the expected score (sum of p·value over the allowed values) and the
probability of `score`, from the model's probabilities; empty for rows the model decoded."""
DEFAULT_SEED = 42
MIN_CTX = 16

InputKind = Literal["csv", "batch"]


def input_kind(path: str | Path) -> InputKind:
    """`batch` for a `.jsonl` / `.json` file, else `csv`."""
    return "batch" if Path(path).suffix.lower() in BATCH_SUFFIXES else "csv"


def output_paths(input_path: str | Path, output: str | Path | None = None) -> tuple[Path, Path]:
    """(scores CSV, results JSONL) of a run: `<stem>_scores.csv` and `<stem>_results.jsonl`
    next to the input, or `output` and `<outstem>_results.jsonl` next to it."""
    src = Path(input_path)
    if output is None:
        scores = src.with_name(f"{src.stem}_scores.csv")
        results = src.with_name(f"{src.stem}_results.jsonl")
    else:
        scores = Path(output)
        results = scores.with_name(f"{scores.stem}_results.jsonl")
    for what, path in (("scores CSV", scores), ("results file", results)):
        if _same_path(path, src):
            raise ConfigError(
                f"the {what} would be the input file itself ({src}); choose another --output"
            )
    if scores.is_dir():
        raise ConfigError(f"--output {scores} is a directory; give a file name such as x.csv")
    return scores, results


def _same_path(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


# -- options ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """What `harness run` was asked to do (the CLI's options, one field each)."""

    input: Path
    """A candidates CSV, or an OpenAI Batch JSONL (`.jsonl` / `.json`)."""
    output: Path | None = None
    """The scores CSV (default `<input stem>_scores.csv` next to the input)."""
    backend: str = "embedded"
    model: str | None = None
    """embedded: a model name or .gguf path (default gemma3-270m); openai/ollama: the server's
    model name (default: the openai server's first model, or OllamaBackend's default)."""
    base_url: str | None = None
    """Server URL for `openai` (required) and `ollama` (default $OLLAMA_HOST or localhost);
    several URLs separated by commas run the job over all of them (a pool: `base_urls`)."""
    servers: int = 1
    """Embedded servers to start (each with `threads` threads and `concurrency` slots): more
    than one runs the job over all of them (a pool, `harness.backends.pool`)."""
    executor: str = "local"
    """`local` (this process runs the engine) or `ray` (a Ray Data pipeline: `harness.rayexec`)."""
    ray_address: str | None = None
    """The Ray cluster for `executor="ray"` (None: start a local instance)."""
    concurrency: int | None = None
    """Requests in flight; the embedded server gets one slot per concurrent request. None:
    harness.yaml's CONCURRENCY, else 1."""
    strategy: str | None = None
    """None: harness.yaml's STRATEGY, else stateless."""
    sample: int | None = None
    """Run a reproducible sample of this many rows (drawn with `seed`), in input order."""
    prompt: Path | None = None
    """Prompt file for CSV input (default: the recruiter rubric)."""
    id_column: str = "id"
    max_tokens: int | None = None
    """Reply tokens for CSV input; None: what the output schema needs (`tokens_for_schema`)."""
    structured: str = "grammar"
    """CSV input: `grammar` (tight GBNF; llama.cpp), `schema` (JSON-schema structured output)
    or `none` (free text, not validated)."""
    ctx: int | None = None
    """Context window of one request in tokens (one server slot; Ollama's num_ctx): longer
    requests are recorded as errors without being sent; the embedded server gets ctx ×
    concurrency tokens. None: harness.yaml's n_ctx (phase 1's measured context), else 8192."""
    request_path: str | None = None
    """llama.cpp servers: `tokens` (ids to /completion, the fastest; the embedded default),
    `text` (the rendered prompt, as Ollama sends it) or `chat` (/v1/chat/completions)."""
    server_flags: str | None = None
    """The embedded server's launch flags: `ollama` (as Ollama ≥ 0.30 starts llama-server;
    default) or `harness` (full-size sliding windows for --strategy conversation)."""
    seed: int = DEFAULT_SEED
    """Seed of the --sample draw and, for CSV input, of the model's sampling."""
    threads: int | None = None
    """CPU threads of the embedded server (None: llama.cpp's default, every core)."""
    progress: bool = True
    config: Path = DEFAULT_CONFIG_PATH
    """The measured configuration (harness.yaml): its trim settings are used when present."""
    profile: str | None = None
    """Profile of the config file (default: `gpu-gemma3-12b` for ollama, else `embedded`)."""
    retry_failed: bool = False
    """Send again the rows whose last result is an error (every id still ends once)."""
    new: bool = False
    """Start over when the results file belongs to another job (the old file is kept, renamed)."""
    stop_on_cache_miss: bool = False
    """Stop at the first reuse alarm (a window of rows whose server computed more than twice
    the prompt tokens the strategy expects: harness.engine.reusewatch); finished rows are kept."""
    score_mode: str | None = None
    """`decode` (the model writes the reply) or `logprobs` (the reply's JSON sent written up to
    the score, the score read from the model's probabilities). None: harness.yaml's SCORE_MODE
    (the performance phase writes it only where both modes agreed), else decode."""

    @property
    def openai_url(self) -> str | None:
        """--base-url, else OPENAI_BASE_URL (as the openai client reads it)."""
        return self.base_url or os.environ.get("OPENAI_BASE_URL") or None

    @property
    def base_urls(self) -> list[str]:
        """The server URLs given (--base-url, several or a comma list), else OPENAI_BASE_URL
        for `openai`; empty when none was given."""
        text = self.openai_url if self.backend == "openai" else self.base_url
        return [u.strip() for u in (text or "").split(",") if u.strip()]

    @property
    def endpoints(self) -> int:
        """How many servers the job runs over (more than one: a pool)."""
        return self.servers if self.backend == "embedded" else max(1, len(self.base_urls))

    def pool_threads(self) -> tuple[int | None, str]:
        """Threads of each embedded server, and where the number came from: --threads, else
        for several servers this machine's cores shared among them (at least one each), so
        they do not all spin on every core; one server: llama.cpp's default (every core)."""
        if self.threads is not None:
            return self.threads, "command line"
        if self.backend != "embedded" or self.servers <= 1:
            return None, "default: every core"
        cores = os.cpu_count() or 1
        return max(1, cores // self.servers), (
            f"default: {cores} cores ÷ {self.servers} servers, at least 1 each"
        )

    @property
    def config_profile(self) -> str:
        return self.profile or ("gpu-gemma3-12b" if self.backend == "ollama" else "embedded")

    def validate(self) -> None:
        """Raise ConfigError naming the option for a setting that cannot work."""
        names = sorted(set(BACKENDS) & set(Backend.names()))
        if self.backend not in names:
            raise ConfigError(
                f"--backend {self.backend!r} is not known; choose one of: {', '.join(names)}"
            )
        if self.request_path is not None and self.request_path not in REQUEST_PATHS:
            raise ConfigError(
                f"--request-path {self.request_path!r} is not known; choose one of: "
                f"{', '.join(REQUEST_PATHS)}"
            )
        if self.request_path is not None and self.backend == "ollama":
            raise ConfigError("--request-path is for llama.cpp servers; Ollama has its own API")
        if self.server_flags is not None and self.server_flags not in SERVER_FLAGS:
            raise ConfigError(
                f"--server-flags {self.server_flags!r}: choose {' or '.join(SERVER_FLAGS)}"
            )
        if self.score_mode is not None and self.score_mode not in SCORE_MODES:
            raise ConfigError(
                f"--score-mode {self.score_mode!r} is not known; choose one of: "
                f"{', '.join(SCORE_MODES)}"
            )
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ConfigError(
                f"--strategy {self.strategy!r} is not known; choose one of: "
                f"{', '.join(sorted(STRATEGIES))}"
            )
        if self.structured not in STRUCTURED_MODES:
            raise ConfigError(
                f"--structured {self.structured!r} is not known; choose one of: "
                f"{', '.join(STRUCTURED_MODES)}"
            )
        for flag, value, least in (
            ("--concurrency", self.concurrency, 1),
            ("--max-tokens", self.max_tokens, 1),
            ("--ctx", self.ctx, MIN_CTX),
        ):
            if value is not None and value < least:
                raise ConfigError(f"{flag} {value} must be at least {least}")
        if self.servers < 1:
            raise ConfigError(f"--servers {self.servers} must be at least 1")
        if self.servers > 1 and self.backend != "embedded":
            raise ConfigError(
                "--servers starts embedded servers; for --backend openai or ollama give each "
                "server's URL (--base-url several times, or a comma list)"
            )
        urls = self.base_urls
        if len(set(urls)) < len(urls):
            raise ConfigError(f"--base-url names a server twice: {', '.join(urls)}")
        if self.executor not in EXECUTORS:
            raise ConfigError(
                f"--executor {self.executor!r} is not known; choose one of: {', '.join(EXECUTORS)}"
            )
        if self.ray_address is not None and self.executor != "ray":
            raise ConfigError("--ray-address is for --executor ray")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads {self.threads} must be at least 1")
        if self.threads is not None and self.backend != "embedded":
            raise ConfigError("--threads is for --backend embedded (the server it starts)")
        if self.sample is not None and self.sample < 1:
            raise ConfigError(f"--sample {self.sample} must be at least 1 (or leave it out)")
        if self.ctx is not None and self.max_tokens is not None and self.max_tokens >= self.ctx:
            raise ConfigError(
                f"--max-tokens {self.max_tokens} leaves no room for the prompt in --ctx {self.ctx}"
            )
        if self.backend == "openai" and not self.openai_url:
            raise ConfigError(
                "--backend openai needs --base-url or OPENAI_BASE_URL (e.g. "
                "http://127.0.0.1:8080/v1)"
            )
        if self.backend == "embedded":
            if self.base_url:
                raise ConfigError(
                    "--base-url is for --backend openai or ollama; the embedded backend starts "
                    "its own server"
                )
            model = self.model or DEFAULT_MODEL
            path = Path(model).expanduser()
            if model not in KNOWN_MODELS and ":" in model and not path.suffix == ".gguf":
                raise ConfigError(
                    f"--model {model!r} looks like an Ollama tag: add --backend ollama (the "
                    f"embedded backend runs {', '.join(KNOWN_MODELS)} or a .gguf file)"
                )
            if model not in KNOWN_MODELS and not (path.suffix == ".gguf" and path.is_file()):
                raise ConfigError(
                    f"--model {model!r} is neither a known model ({', '.join(KNOWN_MODELS)}) "
                    "nor an existing .gguf file"
                )


# -- input ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchInput:
    """A validated input: its work items (input order) and the output fields to report."""

    path: Path
    kind: InputKind
    items: tuple[WorkItem, ...]
    fields: tuple[str, ...]
    """Output-schema fields for the scores CSV, `score` first (empty when there is none)."""
    rows: int
    """Rows (CSV) or lines (batch) in the file, before --sample."""
    prompt: str = ""
    """The prompt that scores: its name and file (CSV), or `the batch lines' own messages`."""
    prompt_sha256: str = ""
    """Hash of the prompt (CSV: system, template, schema; batch: the first line's messages)."""
    input_sha256: str = ""
    """Hash of the whole input file (`harness.inputs.input_sha256`): every row, every line."""


def _schema_fields(schemas: Sequence[Mapping[str, Any] | None]) -> tuple[str, ...]:
    names: list[str] = ["score"]
    for schema in schemas:
        props = schema.get("properties") if schema else None
        if isinstance(props, Mapping):
            names.extend(str(k) for k in props if str(k) not in names)
    return tuple(names)


def _sample_table(table: CandidateTable, n: int | None, seed: int) -> CandidateTable:
    keep = sample_rows(range(len(table.rows)), n, seed)
    return CandidateTable(
        table.path,
        table.columns,
        table.id_column,
        tuple(table.rows[i] for i in keep),
        tuple(table.lines[i] for i in keep),
    )


def load_input(options: BatchOptions) -> BatchInput:
    """Read and validate the input (and prompt file) into work items; raises InputError or
    ConfigError naming the file, line or setting. Creates nothing."""
    path = Path(options.input)
    kind = input_kind(path)
    if kind == "batch":
        if options.prompt is not None:
            raise ConfigError(
                f"--prompt applies to CSV input only; the lines of {path} carry their own messages"
            )
        lines = read_batch_jsonl(path)
        chosen = sample_rows(lines, options.sample, options.seed)
        items = items_from_batch(chosen)
        fields = _schema_fields([it.output_schema for it in items])
        digest = hashlib.sha256(
            orjson.dumps([list(it.prefix) for it in items[:1]], option=orjson.OPT_SORT_KEYS)
        ).hexdigest()
        return BatchInput(
            path,
            kind,
            tuple(items),
            fields,
            len(lines),
            "the batch lines' own messages",
            digest,
            _input_digest(path),
        )
    table = read_candidates_csv(path, options.id_column)
    prompt = load_prompt(options.prompt)
    sampled = _sample_table(table, options.sample, options.seed)
    items = items_from_table(
        sampled,
        prompt,
        max_tokens=options.max_tokens or tokens_for_schema(prompt.output_schema),
        temperature=0.0,
        seed=options.seed,
        structured=options.structured,
    )
    return BatchInput(
        path,
        kind,
        tuple(items),
        _schema_fields([prompt.output_schema]),
        len(table.rows),
        f"{prompt.name} ({prompt.path})",
        prompt.sha256,
        _input_digest(path),
    )


def _input_digest(path: Path) -> str:
    try:
        return input_sha256(path)
    except OSError as exc:  # it was just read: gone or unreadable since
        raise InputError(f"cannot read it again: {exc.strerror or exc}", path=str(path)) from None


# -- convert ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConvertResult:
    input: Path
    output: Path
    lines: int
    rows: int
    """Rows in the CSV (before --sample)."""
    prompt: str


def convert(
    input_path: str | Path,
    output_path: str | Path,
    *,
    id_column: str = "id",
    prompt: str | Path | None = None,
    sample: int | None = None,
    seed: int = DEFAULT_SEED,
    max_tokens: int | None = None,
    model: str | None = None,
) -> ConvertResult:
    """Write one OpenAI Batch line per CSV row (atomically); validates everything first."""
    src, dst = Path(input_path), Path(output_path)
    if input_kind(src) != "csv":
        raise ConfigError(f"convert reads a candidates CSV; {src} is already a batch JSONL")
    if _same_path(src, dst):
        raise ConfigError(f"the output {dst} is the input file itself; choose another name")
    if dst.is_dir():
        raise ConfigError(f"the output {dst} is a directory; give a file name such as x.jsonl")
    if sample is not None and sample < 1:
        raise ConfigError(f"--sample {sample} must be at least 1 (or leave it out)")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"--max-tokens {max_tokens} must be at least 1")
    table = read_candidates_csv(src, id_column)
    spec = load_prompt(prompt)
    max_tokens = max_tokens or tokens_for_schema(spec.output_schema)
    sampled = _sample_table(table, sample, seed)
    # `schema`: the body carries response_format; items_from_batch turns it back into the
    # tight grammar, so a converted file runs exactly like the CSV with --structured grammar.
    items = items_from_table(
        sampled, spec, max_tokens=max_tokens, temperature=0.0, seed=seed, structured="schema"
    )
    out = bytearray()
    for item in items:
        body = item_body(item)
        if model:
            body = {"model": model, **body}  # OpenAI's Batch API requires body.model
        out += orjson.dumps(batch_line(item.custom_id, body))
        out += b"\n"
    atomic_write_text(dst, out.decode("utf-8"))
    return ConvertResult(src, dst, len(items), len(table.rows), spec.path or spec.name)


# -- scores CSV -------------------------------------------------------------------------------


def score_columns(fields: Sequence[str]) -> list[str]:
    """The scores CSV header for these output fields."""
    return ["custom_id", *(fields or ("score",)), *SCORE_COLUMNS, *METRIC_COLUMNS]


def _reply_object(harness: Mapping[str, Any]) -> Mapping[str, Any] | None:
    parsed = harness.get("parsed")
    if isinstance(parsed, Mapping):
        return parsed
    content = harness.get("content")
    if not isinstance(content, str) or not content.strip():
        return None
    try:
        return parse_reply(content, None)
    except ValueError:
        return None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    return orjson.dumps(value).decode("utf-8")


def _rounded(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def _score_of(obj: Mapping[str, Any] | None) -> int | None:
    value = obj.get("score") if obj is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(slots=True)
class _Counts:
    done: int = 0
    failed: int = 0
    scored: int = 0
    foreign: int = 0
    """Results lines whose custom_id is not in this input."""


def write_scores_csv(
    ids: Sequence[str],
    fields: Sequence[str],
    results_path: str | Path,
    scores_path: str | Path,
) -> tuple[int, int, int, int]:
    """Write the scores CSV (atomically) from the results file, one row per finished id in
    `ids` order. Returns (done, failed, scored, lines for ids not in `ids`)."""
    counts = _write_scores(ids, fields, Path(results_path), Path(scores_path))
    return counts.done, counts.failed, counts.scored, counts.foreign


def _write_scores(
    ids: Sequence[str], fields: Sequence[str], results: Path, scores: Path
) -> _Counts:
    # Streamed: each results line becomes its CSV line at once, and only that short text is
    # kept per id (a 170,000-line results file holds every reply body; the CSV lines do not).
    wanted = set(ids)
    columns = score_columns(fields)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    counts = _Counts()
    rows: dict[str, str] = {}
    final: dict[str, tuple[bool, bool]] = {}
    for line in read_results(results):
        cid = line.get("custom_id")
        if cid not in wanted:
            counts.foreign += 1
            continue
        h: Mapping[str, Any] = line.get("harness") or {}
        err = line.get("error")
        ok = err is None
        obj = _reply_object(h) if ok else None
        score = _score_of(obj)
        final[cid] = (ok, score is not None)  # a retried row: its last line is final
        message = ""
        if isinstance(err, Mapping):
            message = f"{err.get('code') or 'Error'}: {err.get('message') or ''}"
        values = {
            "custom_id": cid,
            "score": score,
            "status": "ok" if ok else "error",
            "error": message,
            "prompt_tokens": h.get("prompt_tokens"),
            "cached_tokens": h.get("cached_tokens"),
            "completion_tokens": h.get("completion_tokens"),
            "latency_ms": h.get("latency_ms"),
        }
        for name in fields:
            if name != "score":
                values[name] = obj.get(name) if obj is not None else None
        scoring = h.get("scoring")
        if ok and isinstance(scoring, Mapping) and scoring.get("mode") == "logprobs":
            values["score_expected"] = _rounded(scoring.get("expected"))
            values["score_p"] = _rounded(scoring.get("p"))
        writer.writerow([_cell(values.get(c)) for c in columns])
        rows[cid] = buf.getvalue()
        buf.seek(0)
        buf.truncate()
    for ok, scored in final.values():
        counts.done += ok
        counts.failed += not ok
        counts.scored += scored
    writer.writerow(columns)
    header = buf.getvalue()
    atomic_write_text(scores, header + "".join(rows[cid] for cid in ids if cid in rows))
    return counts


# -- run --------------------------------------------------------------------------------------


def batch_config(options: BatchOptions) -> RunConfig:
    """The run's settings: the command line, then harness.yaml (measured on this backend),
    then defaults (harness.runconfig). With Ollama and no --ctx, the context is the one
    Ollama loaded (read at start), not a guess."""
    embedded = options.backend == "embedded"
    cli: dict[str, Any] = {
        "backend": options.backend,
        "model": options.model,
        "base_url": options.openai_url if options.backend == "openai" else options.base_url,
        "n_ctx": options.ctx,
        "concurrency": options.concurrency,
        "parallel": options.concurrency if embedded else None,
        "strategy": options.strategy,
        "request_path": options.request_path,
        "server_flags": options.server_flags,
        "score_mode": options.score_mode,
    }
    cfg = resolve_run_config(
        profile=options.config_profile,
        config=load_profile(options.config, options.config_profile),
        cli=cli,
    )
    if embedded and cfg.request_path.value is None:
        # A production run on this server, not a prediction of Ollama's: the fastest path.
        cfg = replace(cfg, request_path=Value("tokens", "default (harness run: the fastest)"))
    if embedded and cfg.parallel.source == "default" and cfg.concurrency.value > 1:
        cfg = replace(cfg, parallel=Value(cfg.concurrency.value, "= concurrency"))
    if cfg.server_flags.value == "harness" and cfg.strategy.value == "conversation":
        # A rolling conversation goes back to its start at every trim; full-size sliding
        # windows keep the rubric reusable then, for more KV memory per token.
        cfg = replace(cfg, swa_full=Value(True, "harness flags + conversation strategy"))
    return cfg


def make_backend(options: BatchOptions) -> Backend:
    """The backend the options name (not started): one server, or a pool over several
    (`--servers N`, several `--base-url`). Tests replace this function."""
    cfg = batch_config(options)
    opts = cfg.backend_options()
    if options.backend == "embedded":
        opts["threads"] = options.pool_threads()[0]
    if options.backend == "ollama" and cfg.n_ctx.source == "default":
        # Neither --ctx nor a measured n_ctx: use (and read) the context Ollama loads with.
        opts["num_ctx"] = None
    if not opts.get("model"):
        opts.pop("model", None)
    if options.endpoints == 1:
        return Backend.create(options.backend, **opts)
    if options.backend == "embedded":
        members = [Backend.create("embedded", **opts) for _ in range(options.servers)]
    else:
        members = [
            Backend.create(options.backend, **{**opts, "base_url": url})
            for url in options.base_urls
        ]
    return Backend.create("pool", members=members, per_endpoint=cfg.concurrency.value)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass(slots=True)
class BatchResult:
    """The outcome of `run_batch`: counts over the whole results file, figures of this run."""

    input: Path
    kind: InputKind
    scores_path: Path
    results_path: Path
    total: int
    """Rows of this input (after --sample)."""
    done: int = 0
    """Rows with a result (status ok) in the results file."""
    failed: int = 0
    """Rows recorded as errors in the results file."""
    scored: int = 0
    """Rows whose reply parsed as a JSON object with an integer `score`."""
    skipped: int = 0
    """Rows already in the results file when this run started (resumed)."""
    ran: int = 0
    """Requests finished by this run."""
    foreign: int = 0
    """Results lines for ids that are not in this input (ignored)."""
    elapsed_s: float = 0.0
    throughput_rps: float = 0.0
    token_savings: float | None = None
    """Cached prompt tokens ÷ prompt tokens of the requests that reported them, this run."""
    savings_source: str = "unknown"
    """Where the cached-token figures came from (`server`, `llama.cpp timings`, ...)."""
    uncached_per_request: float | None = None
    """Prompt tokens the server computed per completed request, this run."""
    mean_latency_ms: float | None = None
    mean_decode_ms: float | None = None
    """Mean server decode (generation) time per request, this run (llama.cpp reports it)."""
    mean_prompt_ms: float | None = None
    """Mean server prompt-processing (prefill) time per request, this run."""
    mean_completion_tokens: float | None = None
    interrupted: bool = False
    stopped_by: signal.Signals | None = None
    """What interrupted the run: SIGINT (Ctrl-C) or SIGTERM."""
    server: str = ""
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    """Over several servers: each one's figures this run (rows, completed, errors, req/s,
    savings, latency) and history (when it left, why, after how many answers; when it came
    back), also written to `<results stem>.endpoints.json`. Empty for one server."""
    stopped_reason: str | None = None
    """Why the run ended before its end without a signal (a reuse alarm with
    --stop-on-cache-miss); the rows not run resume on the next run."""
    reuse_alarms: list[dict[str, Any]] = field(default_factory=list)
    """This run's reuse alarms (also on the results lines that closed their windows)."""

    @property
    def not_run(self) -> int:
        return self.total - self.done - self.failed

    @property
    def exit_code(self) -> int:
        """0 all rows done; 1 rows failed or not run; 128 + the signal when interrupted
        (130 for Ctrl-C, 143 for SIGTERM)."""
        if self.interrupted:
            return 128 + int(self.stopped_by or signal.SIGINT)
        return 0 if self.done == self.total else 1

    def summary(self) -> str:
        """The one-line summary `harness run` prints."""

        def ms(v: float | None) -> str:
            return f"{v:.0f} ms" if v is not None else "n/a"

        sav = f"{self.token_savings:.1%}" if self.token_savings is not None else "unknown"
        unc = (
            f"{self.uncached_per_request:.0f} uncached prompt tokens per request, "
            if self.uncached_per_request is not None
            else ""
        )
        resumed = f" ({self.skipped} resumed from earlier runs)" if self.skipped else ""
        left = f", {self.not_run} not run" if self.not_run else ""
        state = (
            "interrupted"
            if self.interrupted
            else "stopped on a reuse alarm"
            if self.stopped_reason
            else "finished"
        )
        alarms = f", {len(self.reuse_alarms)} reuse alarm(s)" if self.reuse_alarms else ""
        return (
            f"run {state}: {self.done} done, {self.failed} failed{left} of {self.total} rows"
            f"{resumed}; this run: {self.ran} requests in {format_duration(self.elapsed_s)} "
            f"({self.elapsed_s:.1f} s, {self.throughput_rps:.2f} completed req/s), {unc}"
            f"token savings {sav} (cached ÷ prompt tokens; source: {self.savings_source}), "
            f"mean latency {ms(self.mean_latency_ms)}, "
            f"mean server decode {ms(self.mean_decode_ms)} per request{alarms}; "
            f"scores: {self.scores_path}; results: {self.results_path}"
        )

    def endpoint_lines(self) -> list[str]:
        """One line per server of a pool (none for one server)."""
        return [endpoint_line(ep) for ep in self.endpoints]


def endpoint_line(ep: Mapping[str, Any]) -> str:
    """`endpoint URL: rows, ok, errors, req/s, p50 latency; left at ... (why)`."""
    lat = (ep.get("latency_ms") or {}).get("p50")
    text = (
        f"endpoint {ep['endpoint']}: {ep.get('rows', 0)} rows ({ep.get('completed', 0)} ok, "
        f"{ep.get('errors', 0)} errors), {ep.get('throughput_rps') or 0.0:.2f} req/s, "
        f"p50 latency {f'{lat:.0f} ms' if lat is not None else 'n/a'}"
    )
    if ep.get("down_at") is not None:
        after = ep.get("down_after_s")
        text += (
            f"; LEFT the run {f'{after:.1f} s in' if after is not None else ''} "
            f"(after {ep.get('down_after_requests')} answers): {ep.get('down_reason')}"
        )
        if ep.get("up"):
            text += f"; back {ep.get('back_after_s') or 0.0:.1f} s in"
    return text


def endpoints_path(results: Path) -> Path:
    """The per-server figures beside a results file: `<stem>.endpoints.json`."""
    return results.with_name(results.stem + ".endpoints.json")


@dataclass(slots=True)
class _Plan:
    options: BatchOptions
    data: BatchInput
    scores: Path
    results: Path
    skipped: int
    config: RunConfig
    job: dict[str, Any]
    """The job's fingerprint, written beside the results when the run starts."""
    tally: MetricsCollector = field(default_factory=MetricsCollector)
    """This run's requests (an engine sink: it keeps its counts after an interruption)."""
    started: float | None = None
    ended: float | None = None

    def add(self, rec: RequestRecord) -> None:
        self.tally.add(rec)
        self.ended = time.perf_counter()

    server: str = ""
    backend: Backend | None = None
    """The backend of this run (a pool's figures are read from it at the end)."""
    endpoint_history: list[dict[str, Any]] | None = None
    """Each server's own account when no pool object keeps it (the Ray executor)."""
    started_unix: float = 0.0
    counts: _Counts | None = None
    """Set once the scores CSV is written."""
    stopped_by: signal.Signals | None = None
    """The signal that stopped the run, when one did (SIGINT or SIGTERM)."""
    stopped_reason: str | None = None
    """Why the engine ended the run before its end without a signal (a reuse alarm with
    --stop-on-cache-miss)."""
    reuse_alarms: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Banner lines about the resume (an old fingerprint without the input's hash)."""

    def write_scores(self) -> None:
        """Write the scores CSV from the results file (when there is one)."""
        if self.results.exists():
            ids = [it.custom_id for it in self.data.items]
            self.counts = _write_scores(ids, self.data.fields, self.results, self.scores)

    def finish(self, *, interrupted: bool = False) -> BatchResult:
        if self.counts is None:
            self.write_scores()
        counts = self.counts or _Counts()
        ids = self.data.items
        t = self.tally
        elapsed = self.ended - self.started if self.started is not None and self.ended else 0.0
        m = t.summary(elapsed)
        endpoints = self.endpoint_figures(m.extra.get("endpoints", {}))
        if endpoints:
            with contextlib.suppress(OutputError):
                atomic_write_json(
                    endpoints_path(self.results),
                    {"elapsed_s": elapsed, "started": self.started_unix, "endpoints": endpoints},
                )
        return BatchResult(
            input=self.data.path,
            kind=self.data.kind,
            scores_path=self.scores,
            results_path=self.results,
            total=len(ids),
            done=counts.done,
            failed=counts.failed,
            scored=counts.scored,
            skipped=self.skipped,
            ran=t.requests,
            foreign=counts.foreign,
            elapsed_s=elapsed,
            throughput_rps=m.throughput_rps,
            token_savings=m.token_savings,
            savings_source=m.cached_source,
            uncached_per_request=m.uncached_tokens_per_request,
            mean_latency_ms=_mean(t.latency),
            mean_decode_ms=_mean(t.decode_ms),
            mean_prompt_ms=_mean(t.prompt_ms),
            mean_completion_tokens=t.completion / t.completed if t.completed else None,
            interrupted=interrupted,
            stopped_by=(self.stopped_by or signal.SIGINT) if interrupted else None,
            server=self.server,
            endpoints=endpoints,
            stopped_reason=self.stopped_reason,
            reuse_alarms=list(self.reuse_alarms),
        )

    def endpoint_figures(self, figures: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        if self.backend is not None and isinstance(self.backend, PoolBackend):
            return endpoint_report(self.backend, figures, self.started_unix)
        if self.endpoint_history is None:
            return []
        out = []
        for ep in self.endpoint_history:
            row = dict(ep)
            for key in ("down_at", "back_at"):
                at = row.get(key)
                row[key.replace("_at", "_after_s")] = at - self.started_unix if at else None
            row.update(figures.get(row["endpoint"], {"rows": 0, "completed": 0, "errors": 0}))
            out.append(row)
        return out


INPUT_KEYS = ("input", "input_sha256")
"""The fingerprint's input: its path (to name it) and the hash of its bytes (compared)."""


def job_fingerprint(options: BatchOptions, data: BatchInput, cfg: RunConfig) -> dict[str, Any]:
    """What makes a results file this job's: a resumed run must send the same requests, to the
    same input's rows (another input with the same ids is another job)."""
    return {
        "input": str(data.path.resolve()),
        "input_sha256": data.input_sha256,
        "prompt": data.prompt,
        "prompt_sha256": data.prompt_sha256,
        "model": cfg.model.value,
        "backend": cfg.backend.value,
        "strategy": cfg.strategy.value,
        "output_fields": list(data.fields),
        "structured": options.structured if data.kind == "csv" else "batch lines",
        "max_tokens": data.items[0].max_tokens
        if data.kind == "csv" and data.items
        else "batch lines",
        "seed": options.seed,
        # Only when not the default: results files written before the setting existed resume.
        **({"score_mode": cfg.score_mode.value} if cfg.score_mode.value != "decode" else {}),
    }


def job_path(results: Path) -> Path:
    """The fingerprint beside a results file: `<stem>.job.json`."""
    return results.with_name(results.stem + ".job.json")


def _check_job(results: Path, job: dict[str, Any], *, new: bool) -> str | None:
    """Refuse to resume another job's results (exit 2 naming what differs: the input first),
    or with `new` move them aside (kept under a new name) and start over. Returns a note for
    the banner when the results' fingerprint predates the input's hash (then not checked)."""
    sidecar = job_path(results)
    if not results.exists() or not sidecar.exists():
        return None
    try:
        old = orjson.loads(sidecar.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"{sidecar}: unreadable job fingerprint ({exc}); use --new") from None
    unchecked = "input_sha256" not in old
    differ = [
        k
        for k in job
        if k != "input" and not (unchecked and k in INPUT_KEYS) and old.get(k) != job[k]
    ]
    if "score_mode" in old and "score_mode" not in job:  # written only when not `decode`
        differ.append("score_mode")
    note = (
        f"resume: the input is not checked against {sidecar.name} (written before the "
        "harness kept the input's hash): resumed by custom_id as before; the fingerprint now "
        "records this input"
        if unchecked
        else None
    )
    if not differ:
        return note
    if not new and "input_sha256" in differ:
        raise ConfigError(
            f"{results} holds the results of another input: {old.get('input')} (sha256 "
            f"{str(old.get('input_sha256'))[:12]}) then, {job['input']} (sha256 "
            f"{job['input_sha256'][:12]}) now; resuming would take that input's results for "
            "this one's rows with the same ids: choose another --output, or run with --new to "
            "start over (the old results are kept under a new name)"
        )
    if not new:
        gone = {"score_mode": "decode"}  # what a key absent from a fingerprint means
        shown = "; ".join(
            f"{k}: {old.get(k, gone.get(k))!r} then, {job.get(k, gone.get(k))!r} now"
            for k in differ
        )
        raise ConfigError(
            f"{results} holds the results of another job ({shown}); resuming would mix the "
            "two: run with --new to start over (the old results are kept under a new name)"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in (results, sidecar):
        path.rename(path.with_name(f"{path.stem}.{stamp}{path.suffix}"))
    return None


def _write_job(results: Path, job: dict[str, Any]) -> None:
    try:
        results.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(job_path(results), job)
    except (OSError, OutputError) as exc:
        raise OutputError(
            f"cannot write next to {results}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


def _one_writer(results: Path) -> contextlib.AbstractContextManager[None]:
    """The lock that makes this process the results file's one writer (`harness.lock`): a
    second `harness run` on the same output exits 2 naming this one, before it reads or
    appends anything."""
    return hold(
        lock_path_for(results),
        what=f"the results file {results}",
        advice="wait for that run to end, or stop it: running the same command again then "
        "resumes where it stopped",
    )


def _prepare(options: BatchOptions, locks: contextlib.ExitStack) -> _Plan:
    options.validate()
    load_profile(options.config, options.config_profile)  # a bad config fails before any output
    data = load_input(options)
    scores, results = output_paths(data.path, options.output)
    config = batch_config(options)
    job = job_fingerprint(options, data, config)
    locks.enter_context(_one_writer(results))  # held until the run (and its scores) ends
    note = _check_job(results, job, new=options.new)
    # Read the results file now: a corrupt one fails before a server starts.
    wanted = {it.custom_id for it in data.items}
    final = read_final(results)
    skipped = sum(
        1
        for cid, line in final.items()
        if cid in wanted and not (options.retry_failed and line.get("error") is not None)
    )
    plan = _Plan(options, data, scores, results, skipped, config=config, job=job)
    plan.notes = [note] if note else []
    return plan


def job_spec(
    cfg: RunConfig,
    *,
    results: Path | None,
    desc: str,
    progress: bool = True,
    retry_failed: bool = False,
    endpoints: int = 1,
    stop_on_cache_miss: bool = False,
) -> JobSpec:
    """The engine's job for a resolved configuration (already capped to the server's
    context): `harness run` and `harness api` run the same. Over several servers (a pool)
    the concurrency is per server: `endpoints` × it requests in flight. Both watch prefix
    reuse; `stop_on_cache_miss` stops at the first alarm."""
    return JobSpec(
        strategy=cfg.strategy.value,
        policy=cfg.policy,
        runner=RunnerConfig(
            concurrency=cfg.concurrency.value * endpoints, score_mode=cfg.score_mode.value
        ),
        results_path=results,
        retry_failed=retry_failed,
        progress=progress,
        desc=desc,
        reuse=ReuseWatchConfig(stop=stop_on_cache_miss),
    )


REUSE_REPORT = Path("reports") / "prefix_reuse_results.json"
"""Phase 1's candidate-length sweep, read (when present) to warn about long candidates."""


def banner(plan: _Plan, server: Backend, lengths: PromptLengths | None = None) -> list[str]:
    """What `harness run` is about to use, each value with where it came from."""
    info, cfg, data = server.info, plan.config, plan.data
    note = ""
    if info.backend == "embedded":
        with contextlib.suppress(ConfigError):
            note = resolve_model(cfg.model.value).note
    lines = [
        f"backend: {info.backend} ({cfg.backend.source}) at {info.base_url}, {info.server}",
        f"model: {info.model} ({cfg.model.source})" + (f" — {note}" if note else ""),
        f"prompt: {data.prompt}, sha256 {data.prompt_sha256[:12]}",
        f"input: {data.path} ({data.rows} {'rows' if data.kind == 'csv' else 'lines'}), "
        f"sha256 {data.input_sha256[:12]}",
        f"context: {info.n_ctx_per_slot or cfg.n_ctx.value} tokens per request ("
        + str(info.extra.get("context_source") or f"n_ctx {cfg.n_ctx.source}")
        + ")",
        f"strategy: {cfg.strategy.value} ({cfg.strategy.source}); trim at "
        f"{cfg.trim_threshold.value} tokens ({cfg.trim_threshold.source}), every "
        f"{cfg.trim_interval.value or 'unlimited'} requests ({cfg.trim_interval.source})",
        f"concurrency: {cfg.concurrency.value} ({cfg.concurrency.source})"
        + (" per server" if plan.options.endpoints > 1 else "")
        + f"; server slots: {info.n_slots or cfg.parallel.value} ({cfg.parallel.source}"
        + (", all servers together)" if plan.options.endpoints > 1 else ")"),
        f"request path: {info.extra.get('request_path', 'native')} ({cfg.request_path.source})",
        "max tokens per reply: "
        + (
            f"{plan.options.max_tokens} (command line)"
            if plan.options.max_tokens
            else f"{data.items[0].max_tokens if data.items else '-'} "
            "(computed from the output schema)"
            if data.kind == "csv"
            else "each batch line's own"
        ),
    ]
    if info.backend == "embedded":
        lines.append(
            f"server flags: {cfg.server_flags.value} ({cfg.server_flags.source}): "
            + " ".join(info.extra.get("llama_server_args", []))
        )
    found = plan.options.config.exists()
    lines.append(
        f"config: {plan.options.config} profile {plan.options.config_profile} "
        + ("(read)" if found else "(not found: measured values not used)")
    )
    lines += [f"not applied: {why}" for why in cfg.ignored]
    lines += plan.notes
    options = plan.options
    if options.endpoints > 1:
        names = info.extra.get("endpoints") or options.base_urls
        how = "--servers" if options.backend == "embedded" else "--base-url"
        lines.append(
            f"servers: {options.endpoints} ({how}, command line): {', '.join(map(str, names))}; "
            "each row goes to the next free worker, each worker stays on one server"
        )
    if options.backend == "embedded":
        threads, source = options.pool_threads()
        lines.append(f"threads per server: {threads or 'every core'} ({source})")
    if lengths is not None:
        lines.append(lengths.describe())
    return lines


def reuse_warning(lengths: PromptLengths, info: Any, report: Path) -> str | None:
    """A warning when the job's p99 candidate is as long as those at which phase 1's sweep saw
    the server stop reusing the rubric (None when no sweep report of this backend and model
    exists, or reuse held)."""
    found = find_report(report.parent, report.name, model=info.model)
    if found is None:
        return None
    report, data = found
    raw = data.get("backend")
    measured: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if (measured.get("name"), measured.get("model")) != (info.backend, info.model):
        return None  # another server's sweep says nothing about this one
    path = data.get("production_path")
    falls = (data.get("reuse_falls_at_tokens") or {}).get(path)
    if not isinstance(falls, int | float) or lengths.p99 < falls:
        return None
    return (
        f"the p99 candidate ({lengths.p99} tokens after the rubric) is as long as those at "
        f"which {report} saw the server stop reusing the whole rubric (from ~{falls} tokens, "
        f"{path} path): expect less prefix-cache saving on long rows; a larger num_batch "
        "(Ollama's batch size, llama-server's -ub) keeps more sliding-window cells"
    )


async def preflight(plan: _Plan, server: Backend, counter: TokenCounter) -> JobSpec:
    """On a started server, before any request: print the banner (every setting and its
    source, the prompt's lengths), warn about rows too long for the context, write the job's
    fingerprint; returns the engine's job. Both executors run it."""
    options, data = plan.options, plan.data
    info = server.info
    plan.server = f"{info.backend} {info.model} at {info.base_url} ({info.server})"
    cfg = plan.config.capped(info.n_ctx_per_slot)
    lengths = await measure_lengths(counter, data.items)
    mode, mode_line = await choose_score_mode(
        cfg,
        server,
        counter,
        data.items[0].output_schema if data.items else None,
        load_profile(options.config, options.config_profile),
    )
    for line in [*banner(plan, server, lengths), mode_line]:
        print(f"harness run: {line}", file=sys.stderr, flush=True)
    too_long = check_fits(
        lengths,
        cfg.max_context_tokens.value,
        context_source=str(
            info.extra.get("context_source")
            or f"MAX_CONTEXT_TOKENS, {cfg.max_context_tokens.source}"
        ),
    )
    for warning in (too_long, reuse_warning(lengths, info, REUSE_REPORT)):
        if warning:
            print(f"harness run: warning: {warning}", file=sys.stderr, flush=True)
    spec = job_spec(
        cfg,
        results=plan.results,
        desc=f"run {data.path.name}",
        progress=options.progress,
        retry_failed=options.retry_failed,
        endpoints=len(info.extra.get("endpoints") or [None]),
        stop_on_cache_miss=options.stop_on_cache_miss,
    )
    spec.runner = replace(spec.runner, score_mode=mode)
    _write_job(plan.results, plan.job)
    plan.backend = server
    plan.started_unix = time.time()
    plan.started = time.perf_counter()
    return spec


async def _execute(plan: _Plan, backend: Backend | None) -> BatchResult:
    options, data = plan.options, plan.data
    try:
        if plan.skipped < len(data.items):
            server = backend if backend is not None else make_backend(options)
            async with server, open_token_counter(server) as counter:
                spec = await preflight(plan, server, counter)
                job = await run_job(server, data.items, spec, sinks=[plan.add], counter=counter)
                plan.reuse_alarms = list(job.reuse_alarms)
                plan.stopped_reason = job.error
    finally:
        # Also after Ctrl-C (cancellation) or a server failure: the scores so far.
        plan.write_scores()
    return plan.finish()


async def run_batch_async(options: BatchOptions, *, backend: Backend | None = None) -> BatchResult:
    """Validate, run and write the scores CSV; see `run_batch`. Cancellation propagates (the
    results so far are kept and the scores CSV written)."""
    with contextlib.ExitStack() as locks:
        return await _run(_prepare(options, locks), backend)


async def _run(plan: _Plan, backend: Backend | None) -> BatchResult:
    if plan.options.executor == "ray":
        from harness.rayexec import execute_ray  # Ray is an optional extra

        return await execute_ray(plan, backend, make_backend=make_backend, preflight=preflight)
    return await _execute(plan, backend)


async def _stop_on_sigterm(plan: _Plan, backend: Backend | None) -> BatchResult:
    # SIGTERM (`kill`, `timeout`, a service manager) stops the run like Ctrl-C: cancel, stop
    # the server, keep the results. Python's default would end the process at once and leave
    # the embedded server running, orphaned.
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    installed = False
    if task is not None:

        def terminate() -> None:
            plan.stopped_by = signal.SIGTERM
            task.cancel()

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, terminate)  # main thread, Unix only
            installed = True
    try:
        return await _run(plan, backend)
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGTERM)


def run_batch(options: BatchOptions, *, backend: Backend | None = None) -> BatchResult:
    """Validate everything, run the batch (resuming from the results file), write the scores
    CSV. `backend`: a backend to use instead of the one the options name (not started yet).

    Raises InputError / ConfigError before creating anything; LockHeld when another process
    writes the same results file (nothing read or appended); BackendError when the server is
    unreachable or wrong (the results so far are kept and the scores CSV written). Ctrl-C
    (SIGINT) or SIGTERM stops cleanly (the server too) and returns a result with
    `interrupted=True` (`exit_code` 130 or 143).
    """
    with contextlib.ExitStack() as locks:
        plan = _prepare(options, locks)
        try:
            return asyncio.run(_stop_on_sigterm(plan, backend))
        except KeyboardInterrupt:
            return plan.finish(interrupted=True)
        except asyncio.CancelledError:
            if plan.stopped_by is None:
                raise
            return plan.finish(interrupted=True)
