"""What `harness run` (and `harness api`, `harness doctor`) was asked to do: `BatchOptions`, one
field per command-line option (the options themselves are declared once, as data, in
`harness.run.given`), checked before anything is created (`validate`), and resolved into a
run's settings once (`batch_config`: `harness.run.resolve` with `RUN_RULES`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness.backends import Backend
from harness.backends.openai import REQUEST_PATHS
from harness.backends.server import SERVER_FLAGS
from harness.config import DEFAULT_CONFIG_PATH
from harness.engine.strategies import STRATEGIES
from harness.errors import ConfigError
from harness.models.registry import DEFAULT_MODEL, KNOWN_MODELS
from harness.run.given import DEFAULT_SEED, EXECUTORS, VALIDATED, Given
from harness.run.resolve import RUN_RULES, default_profile, resolve, threads_per_server
from harness.run.settings import CLI, RunConfig
from harness.scoring import SCORE_MODES
from harness.workload import STRUCTURED_MODES

__all__ = [
    "BACKENDS",
    "DEFAULT_SEED",
    "EXECUTORS",
    "MIN_CTX",
    "BatchOptions",
    "batch_config",
    "with_validated_job",
]


BACKENDS = tuple(Backend.runnable())
"""Backends `harness run` can use (the registry's, `Backend.runnable()`, as it was at import)."""

MIN_CTX = 16


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
    rescore_changed: bool = False
    """On resume, score again the rows whose content changed since they were scored (their
    earlier lines are moved out of the results file); without it such a row refuses the run."""
    on_bad_row: str = "refuse"
    """`refuse` (every bad row in one error) or `skip` (the good rows run; the bad ones are
    written to `<stem>_rejects.csv`)."""
    keep_columns: str | None = None
    """Input columns the scores CSV carries over (`a,b` or `all`)."""
    new: bool = False
    """Start over when the results file belongs to another job (the old file is kept, renamed)."""
    stop_on_cache_miss: bool = False
    """Stop at the first reuse alarm (a window of rows whose server computed more than twice
    the prompt tokens the strategy expects: harness.engine.reusewatch); finished rows are kept."""
    require_go: bool = False
    """Exit 2 before any request unless the job is the validated one and its verdict is GO."""
    from_validated: tuple[str, ...] = ()
    """The options the validated job in harness.yaml set (`with_validated_job`): the banner
    names them."""
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
        return threads_per_server(self.threads, self.backend, self.servers)

    @property
    def config_profile(self) -> str:
        return self.profile or default_profile(self.backend)

    def validate(self) -> None:
        """Raise ConfigError naming the option for a setting that cannot work."""
        names = sorted(Backend.runnable())
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


def with_validated_job(input: Path, given: Given) -> dict[str, Any]:
    """`harness run`'s (or `harness doctor`'s) options (`given`, None where the command line
    left an option out) with the job `harness validate` recorded for `input` filling the gaps
    (`Given.with_validated_job`), then the defaults (`FALLBACK`), as `BatchOptions`' keyword
    arguments; `from_validated` names what the record set."""
    return given.with_validated_job(input).with_fallback().options()


def batch_config(options: BatchOptions) -> RunConfig:
    """The run's settings: the command line, then harness.yaml (measured on this backend),
    then defaults, then `harness run`'s own rules (`harness.run.resolve.RUN_RULES`). With
    Ollama and no --ctx, the context is the one Ollama loaded (read at start), not a guess."""
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
        "servers": options.servers if embedded and options.servers > 1 else None,
        "threads": options.threads,
    }
    cfg = resolve(
        profile=options.config_profile, config_path=options.config, cli=cli, rules=RUN_RULES
    )
    # What the validated job set is not the command line's: the banner says where it came from.
    relabel = {
        name: replace(value, source=VALIDATED)
        for name in ("backend", "model", "base_url")
        if name in options.from_validated and (value := getattr(cfg, name)).source == CLI
    }
    return replace(cfg, **relabel) if relabel else cfg
