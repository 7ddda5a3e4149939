"""What a caller gave: every option of `harness run`, and the ones `harness api`, `harness doctor`,
`harness convert` and the pytest plugin (`--harness-*`) share with it, declared once, as data.

`OPTIONS` is the table: one `Option` per setting, its flag, type, default, help and the commands
that take it (`variants`: what differs from one command to the next, its help above all, so
that each command's `--help` reads as it did). From it:

- `add_options(parser, command, *names)` declares a command's options on its argparse parser;
- `given(args, command)` reads them back as a `Given`: the frozen mapping of what the caller
  gave, field by field (the fields of `BatchOptions` / `ApiSettings`, the same names), converted
  (`Path`, several `--base-url` as one comma list);
- `harness_options(*names)` and `from_pytest(option)`: the `--harness-*` options, and the `Given`
  they make, by the same names.

`Given.with_validated_job(input)` is the one resolution of a job against what `harness validate`
recorded (harness.yaml `jobs`): `harness run`, `harness doctor` and the pytest options all call
it, so the job a user validated is the job each of them sends (`harness.run.resolve` then turns
it into a run's settings).

An option `harness run` and `harness api` share (`--backend`, `--servers`, `--request-path`,
...) is one row here: both parsers, and the settings both build, read it.

`Parser` is every harness command's argparse parser: usage errors in one line (exit 2), no
abbreviated options (an abbreviation would take a secret past the names that redact it, and
would change meaning the day an option with the same prefix is added), and no secret in an error
message (`harness.lock.scrubbed`). `Formatter` is their help's layout.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

from harness.backends import Backend
from harness.backends.openai import REQUEST_PATHS
from harness.backends.server import SERVER_FLAGS
from harness.config import DEFAULT_CONFIG_PATH, find_job
from harness.engine.strategies import STRATEGIES
from harness.lock import scrubbed
from harness.models.registry import DEFAULT_MODEL, KNOWN_MODELS
from harness.scoring import SCORE_MODES
from harness.workload import DEFAULT_PROMPT_PATH, ON_BAD_ROW, STRUCTURED_MODES

__all__ = [
    "COMMANDS",
    "DEFAULT_SEED",
    "EXECUTORS",
    "FALLBACK",
    "JOB_DATA",
    "OPTIONS",
    "RECORDED",
    "SERVER_BOUND",
    "VALIDATED",
    "Formatter",
    "Given",
    "Option",
    "Parser",
    "add_options",
    "at_least_one",
    "backend_name",
    "count",
    "from_pytest",
    "given",
    "harness_options",
    "option",
]


class Parser(argparse.ArgumentParser):
    """A harness command's parser: options spelled in full only (`allow_abbrev=False`, for
    subcommands too), usage errors in one line on stderr (exit 2) pointing at --help, with every
    secret the command line carried replaced by `***`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {scrubbed(message)} (see `{self.prog} --help`)\n")


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with each option's default, descriptions as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # No "(default: None)": options without a default say in their help what happens.
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


DEFAULT_SEED = 42
"""Seed of `--sample`'s draw and of each request's sampling."""

EXECUTORS = ("local", "ray")
"""Who runs the engine: this process, or a Ray Data pipeline (`harness.rayexec`)."""

COMMANDS = ("run", "api", "doctor", "convert", "validate", "pytest")
"""Who takes options from the table (`pytest`: the plugin's `--harness-*` options)."""

Help = str | Callable[[], str]
"""A help text, or a function that writes it when the parser is built (one that names the
backends reads the registry then, so a backend registered later is listed)."""


def count(text: str) -> int:
    """An argparse type: a whole number, not negative (`1_000` reads as 1000, as Python reads
    it; `_10` and `1__0` are not numbers)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return value


def at_least_one(text: str) -> int:
    """A `--harness-*` type: a whole number of at least 1 (ValueError with the message)."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise ValueError(f"{text} must be at least 1")
    return value


def backend_name(text: str) -> str:
    """A `--harness-*` type: a registered backend's name (ValueError naming the known ones)."""
    names = Backend.runnable()
    if text not in names:
        listed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
        raise ValueError(f"--harness-backend {text!r}: choose {listed}")
    return text


def _path(value: Any) -> Path | None:
    return Path(value) if value else None


def _urls(value: Any) -> str | None:
    """`--base-url` given several times (`action="append"`) as one comma list."""
    if isinstance(value, list):
        return ",".join(value) if value else None
    return value or None


@dataclass(frozen=True, slots=True)
class Option:
    """One setting a caller gives: its argparse declaration, the same for every command that
    takes it but for what `variants` changes, and how its value is read back (`convert`)."""

    name: str
    """The field of `BatchOptions` / `ApiSettings` it sets (and the argparse `dest`)."""
    flag: str
    variants: Mapping[str, Mapping[str, Any]]
    """The commands that take it, each with the argparse keywords that differ for it (`help`,
    `default`, `action`, `metavar`, ...); `pytest`: the plugin's `--harness-<flag>` option."""
    help: Help | None = None
    default: Any = None
    type: Callable[[str], Any] | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    action: str | None = None
    convert: Callable[[Any], Any] | None = None
    """From the parsed value to the field's (None: as parsed)."""

    @property
    def commands(self) -> tuple[str, ...]:
        return tuple(self.variants)

    def keywords(self, command: str) -> dict[str, Any]:
        """The argparse keywords of this option for `command` (help written now)."""
        if command not in self.variants:
            raise KeyError(f"{self.flag} is not an option of {command!r}")
        kw: dict[str, Any] = {
            "help": self.help,
            "default": self.default,
            "type": self.type,
            "metavar": self.metavar,
            "choices": list(self.choices) if self.choices is not None else None,
            "action": self.action,
            "dest": self.name,
        }
        kw.update(self.variants[command])
        if callable(kw["help"]):
            kw["help"] = kw["help"]()
        if kw["action"] in ("store_true", "store_false"):
            for key in ("type", "metavar", "choices"):
                kw.pop(key)
            if kw["default"] is None:
                kw.pop("default")
        return {k: v for k, v in kw.items() if v is not None or k == "default"}

    def value(self, parsed: Any) -> Any:
        return self.convert(parsed) if self.convert is not None else parsed


def _backends() -> str:
    return " | ".join(Backend.runnable())


def _strategies() -> str:
    return " | ".join(sorted(STRATEGIES, reverse=True))


_RUN = "run"
_API = "api"
_DOCTOR = "doctor"
_CONVERT = "convert"
_VALIDATE = "validate"
_PYTEST = "pytest"
_ANY: Mapping[str, Any] = {}

OPTIONS: tuple[Option, ...] = (
    Option(
        "output", "--output", {_RUN: _ANY}, metavar="OUT.csv", convert=_path,
        help="scores CSV to write; the results go next to it as <OUT stem>_results.jsonl "
        "(default: <INPUT stem>_scores.csv next to INPUT)",
    ),
    Option(
        "backend", "--backend",
        {
            _RUN: {"default": None, "help": lambda: f"model server: {_backends()} (default: "
                   "the validated job's, harness.yaml `jobs`, else embedded)"},
            _VALIDATE: {"default": None},
            _API: _ANY,
            _DOCTOR: {"default": None, "help": "embedded | openai | ollama (default: the "
                      "validated job's, harness.yaml `jobs`, else embedded)"},
            _PYTEST: {
                "default": None, "type": backend_name,
                "help": "model server: embedded (llama.cpp started here), openai, ollama. "
                "Default: the scenario profile's backend, else 'embedded'",
            },
        },
        default="embedded",
        help=lambda: f"model server: {_backends()}",
    ),
    Option(
        "model", "--model",
        {
            _RUN: _ANY,
            _VALIDATE: _ANY,
            _API: {
                "help": lambda: f"embedded: {', '.join(KNOWN_MODELS)} or a .gguf path (default "
                f"{DEFAULT_MODEL}); openai/ollama: the server's model name (default: the "
                "server's own choice)",
            },
            _DOCTOR: {"help": "the model (default: the backend's)"},
            _CONVERT: {
                "help": "body.model of each line (OpenAI's Batch API requires it; `harness run` "
                "uses its own --model)",
            },
            _PYTEST: {
                "help": "model name or .gguf path (embedded), served model (openai), Ollama tag. "
                "Default: the scenario profile's, else gemma3-270m / gemma3:12b",
            },
        },
        help=lambda: f"embedded: {', '.join(KNOWN_MODELS)} or a .gguf path (default "
        f"{DEFAULT_MODEL}); ollama: a tag (default gemma3:12b); openai: the served model "
        "(default: the server's first)",
    ),
    Option(
        "base_url", "--base-url",
        {
            _RUN: {"action": "append"},
            _VALIDATE: _ANY,
            _API: {
                "help": "server URL for --backend openai (required) or ollama (default: "
                "$OLLAMA_HOST)",
            },
            _DOCTOR: {"help": "the server's URL"},
            _PYTEST: {
                "metavar": None,
                "help": "server URL for openai/ollama (ollama: $OLLAMA_HOST). Default: "
                "%(default)r",
            },
        },
        metavar="URL", convert=_urls,
        help="server URL for --backend openai (default: $OPENAI_BASE_URL; e.g. "
        "http://127.0.0.1:8080/v1) or ollama (default: $OLLAMA_HOST or http://127.0.0.1:11434). "
        "Several (the option again, or a comma list) run one job over all of them: each worker "
        "stays on one server (its conversation and prefix cache with it), rows go to whichever "
        "worker is free, and a server that dies is taken out (its rows go to the others)",
    ),
    Option(
        "servers", "--servers",
        {
            _RUN: _ANY,
            _API: {
                "help": "embedded servers to start, each with --threads threads and "
                "--concurrency slots; more than one runs every batch over all of them (as a "
                "comma list of --base-url does), and each is noted so that a restart after a "
                "kill stops them all",
            },
        },
        default=1, type=count, metavar="N",
        help="embedded servers to start, each with --threads threads and --concurrency slots; "
        "more than one runs one job over all of them (as several --base-url do)",
    ),
    Option(
        "executor", "--executor", {_RUN: _ANY}, default="local", choices=EXECUTORS,
        help="who runs the engine: this process (local), or a Ray Data pipeline of actors, one "
        "per server, with this process writing the results (ray; needs the `ray` extra)",
    ),
    Option(
        "ray_address", "--ray-address", {_RUN: _ANY}, metavar="ADDR",
        help="the Ray cluster for --executor ray (default: start a local instance)",
    ),
    Option(
        "concurrency", "--concurrency",
        {
            _RUN: _ANY,
            _API: {
                "help": "requests in flight; the embedded server gets N slots of --ctx tokens "
                "each (default: harness.yaml's, else 1)",
            },
        },
        type=count, metavar="N",
        help="requests in flight, per server when there are several (the embedded server gets "
        "N slots of --ctx tokens each) (default: harness.yaml's CONCURRENCY, else 1)",
    ),
    Option(
        "strategy", "--strategy",
        {
            _RUN: _ANY,
            _API: {
                "help": lambda: f"{_strategies()}, as for `harness run` (default: harness.yaml's "
                "STRATEGY, else stateless)",
            },
        },
        help=lambda: f"{_strategies()}: one request per row with the shared rubric (the "
        "server's prefix cache reuses it), or rolling conversations restarted by the trim "
        "policy (default: harness.yaml's STRATEGY, else stateless)",
    ),
    Option(
        "request_path", "--request-path", {_RUN: _ANY, _API: _ANY}, choices=REQUEST_PATHS,
        help="how requests reach a llama.cpp server: tokens (the prompt's token ids to "
        "/completion: no template or tokenizing on the server), text (the rendered prompt, as "
        "Ollama sends it) or chat (/v1/chat/completions) (default: tokens for the embedded "
        "server, chat for --backend openai)",
    ),
    Option(
        "server_flags", "--server-flags", {_RUN: _ANY, _API: _ANY}, choices=SERVER_FLAGS,
        help="how the embedded server is started: ollama (the llama-server flags Ollama >= 0.30 "
        "uses) or harness (full-size sliding windows for --strategy conversation) (default: "
        "harness.yaml's SERVER_FLAGS, written by phase 1, else ollama)",
    ),
    Option(
        "input", "--input", {_PYTEST: _ANY}, metavar="FILE.csv",
        help="your candidates CSV: every phase draws its rows from it (a seeded sample; a phase "
        "larger than the file cycles it, each repeat marked so no cache serves it as new) "
        "instead of generated rows. Default: generated rows, as each report then says",
    ),
    Option(
        "id_column", "--id-column",
        {_RUN: {"default": None, "help": "CSV column holding each row's unique id: the scores "
                "CSV keeps its name, the results lines call it custom_id (default: the "
                "validated job's, harness.yaml `jobs`, else id)"},
         _DOCTOR: {"default": None, "help": "CSV column holding each row's unique id "
                   "(default: the validated job's, harness.yaml `jobs`, else id)"},
         _CONVERT: _ANY, _VALIDATE: _ANY,
         _PYTEST: {"default": None, "help": "the column of --harness-input holding each row's "
                   "unique id. Default: the validated job's (harness.yaml `jobs`), else id"}},
        default="id",
        help="CSV column holding each row's unique id (becomes custom_id)",
    ),
    Option(
        "prompt", "--prompt",
        {_RUN: {"help": "prompt file (system, user_template with {column} placeholders, "
                "output_schema) for CSV input (default: the validated job's, harness.yaml "
                "`jobs`, else the recruiter rubric, "
                f"{DEFAULT_PROMPT_PATH.parent.parent.name}/prompts/{DEFAULT_PROMPT_PATH.name})"},
         _DOCTOR: _ANY, _CONVERT: _ANY, _VALIDATE: _ANY,
         _PYTEST: {"help": "your prompt file: every phase sends it (the quality phase's probe "
                   "prompt included). Default: each scenario's, the recruiter rubric"}},
        metavar="PROMPT.yaml", convert=_path,
        help="prompt file (system, user_template with {column} placeholders, output_schema) "
        f"for CSV input (default: the recruiter rubric, "
        f"{DEFAULT_PROMPT_PATH.parent.parent.name}/prompts/{DEFAULT_PROMPT_PATH.name})",
    ),
    Option(
        "sample", "--sample", {_RUN: _ANY, _DOCTOR: _ANY, _CONVERT: _ANY}, type=count,
        metavar="N",
        help="use a reproducible sample of N rows (drawn with --seed), kept in input order "
        "(default: every row)",
    ),
    Option(
        "seed", "--seed", {_RUN: _ANY, _DOCTOR: _ANY, _CONVERT: _ANY}, default=DEFAULT_SEED,
        type=int,
        help="seed of the --sample draw and of each request's sampling (`seed` in the body)",
    ),
    Option(
        "max_tokens", "--max-tokens",
        {
            _RUN: _ANY,
            _DOCTOR: {"default": 16, "help": None},
            _CONVERT: {
                "metavar": None,
                "help": "max_tokens of each request (default: what the prompt's output schema "
                "needs)",
            },
        },
        type=count, metavar="N",
        help="tokens per reply for CSV input (batch lines carry their own) (default: what the "
        "prompt's output schema needs: its longest answer + 8, 256 when a field is free text)",
    ),
    Option(
        "structured", "--structured", {_RUN: _ANY}, default="grammar",
        help=lambda: f"{' | '.join(STRUCTURED_MODES)}: how CSV replies are held to the output "
        "schema: a tight GBNF grammar (llama.cpp; others get the schema), JSON-schema "
        "structured output, free text parsed afterwards (unconstrained), or free text not "
        "parsed (none). A reply that does not parse is retried once, then recorded as the "
        "row's error",
    ),
    Option(
        "score_mode", "--score-mode",
        {
            _RUN: _ANY,
            _PYTEST: {
                "help": "decode: the model writes each reply; logprobs: the reply's JSON is sent "
                "written up to the score and the score read from the model's probabilities (the "
                "quality suite runs its checks in it). Default: harness.yaml's SCORE_MODE, else "
                "decode",
            },
        },
        choices=SCORE_MODES,
        help="decode: the model writes each reply; logprobs: the reply's JSON is sent written "
        "up to the score, and the score is read from the model's probabilities in one step "
        "(score, score_expected, score_p; needs llama.cpp or Ollama >= 0.12.11 and an output "
        "schema whose first field is an integer range or an enum, else rows are decoded and the "
        "banner says why) (default: harness.yaml's SCORE_MODE, which the performance phase "
        "writes only where both modes gave the same scores; else decode)",
    ),
    Option(
        "ctx", "--ctx",
        {
            _RUN: _ANY,
            _API: {
                "help": "context window of one request in tokens; a longer request is that "
                "line's error (default: harness.yaml's n_ctx, else 8192)",
            },
            _DOCTOR: {"help": "context of one request (default: as harness run resolves it)"},
        },
        type=count, metavar="N",
        help="context window of ONE request in tokens (one server slot; Ollama's num_ctx); a "
        "longer request is recorded as that row's error, not sent (default: harness.yaml's "
        "n_ctx from phase 1; Ollama: the context it loaded the model with; else 8192)",
    ),
    Option(
        "threads", "--threads",
        {
            _RUN: _ANY,
            _VALIDATE: _ANY,
            _API: {"help": "CPU threads of the embedded server (default: every core)"},
            _PYTEST: {
                "metavar": None, "type": at_least_one,
                "help": "CPU threads of each embedded server (as harness run --threads): on a "
                "machine other work keeps busy, llama.cpp's default (every core) spin-waits and "
                "runs several times slower. Default: llama.cpp's, every core",
            },
        },
        type=count, metavar="N",
        help="CPU threads of each embedded server (default: every core; with --servers N, the "
        "cores shared among them, at least 1 each; on a machine shared with other busy "
        "processes, fewer threads avoid llama.cpp's spin-waiting)",
    ),
    Option(
        "config", "--config",
        {
            _RUN: _ANY,
            _VALIDATE: {"default": None},
            _API: {
                "help": "measured configuration: its values (strategy, concurrency, context, "
                "trim policy) apply where no option sets them",
            },
            _DOCTOR: {"default": "harness.yaml", "help": None},
            _PYTEST: {
                "metavar": None,
                "help": "the production config file to read and write back. Default: "
                "%(default)r",
            },
        },
        default=str(DEFAULT_CONFIG_PATH), metavar="harness.yaml", convert=_path,
        help="measured configuration: its MAX_CONTEXT_TOKENS, CONTEXT_TRIM_THRESHOLD and "
        "TRIM_INTERVAL set the trim policy when present (written by --write-config)",
    ),
    Option(
        "profile", "--profile",
        {
            _RUN: _ANY,
            _VALIDATE: _ANY,
            _API: _ANY,
            _PYTEST: {"help": "scenario profile (embedded, gpu-gemma3-12b). Default: by backend"},
        },
        help="profile of the config file (default: gpu-gemma3-12b for ollama, else embedded)",
    ),
    Option(
        "retry_failed", "--retry-failed", {_RUN: _ANY}, action="store_true",
        help="send again the rows whose last result is an error; each id still ends once in "
        "the scores (the latest result wins; the results file marks the retry)",
    ),
    Option(
        "rescore_changed", "--rescore-changed", {_RUN: _ANY}, action="store_true",
        help="on resume, score again the rows whose content changed since they were scored "
        "(their earlier lines move to <results stem>.replaced.jsonl); without it such a row "
        "stops the run before anything is sent (exit 2, naming it)",
    ),
    Option(
        "on_bad_row", "--on-bad-row", {_RUN: _ANY}, default="refuse", choices=ON_BAD_ROW,
        help="a bad input row (wrong number of fields, empty or repeated id; a batch line that "
        "is not a request): `refuse` the input, listing every bad row in one error (default), "
        "or `skip` it: the good rows run, the bad ones go to <stem>_rejects.csv (line, id, "
        "reason), and the exit status is 3 when every good row is done",
    ),
    Option(
        "keep_columns", "--keep-columns", {_RUN: _ANY}, metavar="A,B|all",
        help="input columns the scores CSV carries over, after the id (`all`: every one); a "
        "column named like one the harness writes (score, status, error, ...) is refused",
    ),
    Option(
        "stop_on_cache_miss", "--stop-on-cache-miss",
        {
            _RUN: _ANY,
            _API: {
                "help": "fail a batch at its first reuse alarm (a window of 50 requests whose "
                "server computed more than twice the prompt tokens the strategy expects); "
                "without it the alarm is logged and kept on the results line, and the batch "
                "goes on",
            },
        },
        action="store_true",
        help="stop at the first reuse alarm: a window of 50 rows whose server computed more "
        "than twice the prompt tokens the strategy expects (it stopped reusing the rubric); "
        "finished rows are kept, the same command resumes. Without it the alarm is printed "
        "and recorded in the results, and the run goes on",
    ),
    Option(
        "require_go", "--require-go", {_RUN: _ANY}, action="store_true",
        help="exit 2 before any request unless this job is the one `harness validate` "
        "recorded and its verdict is GO (the banner's `validated:` line says why not)",
    ),
    Option(
        "new", "--new", {_RUN: _ANY}, action="store_true",
        help="start over when the results file belongs to another job (another prompt, model, "
        "strategy, ...): the old results are kept under a new name",
    ),
    Option(
        "progress", "--no-progress", {_RUN: _ANY}, action="store_false",
        help="no progress bar or progress lines on stderr",
    ),
)  # fmt: skip

_BY_NAME = {o.name: o for o in OPTIONS}


def option(name: str) -> Option:
    """The option that sets the field `name`."""
    return _BY_NAME[name]


def _names(command: str, names: tuple[str, ...]) -> tuple[str, ...]:
    return names or tuple(o.name for o in OPTIONS if command in o.variants)


def add_options(parser: argparse.ArgumentParser, command: str, *names: str) -> None:
    """Declare `command`'s options on `parser`: `names` in that order (none: every option of
    the command, in the table's order)."""
    for name in _names(command, names):
        o = _BY_NAME[name]
        parser.add_argument(o.flag, **o.keywords(command))


RECORDED = ("prompt", "id_column", "backend", "model", "base_url", "profile")
"""The options a validated job (harness.yaml `jobs`) sets when the caller leaves them out."""
SERVER_BOUND = ("model", "base_url", "profile")
"""Of those, the ones that belong to the record's backend: taken only when the backend the caller
runs is the record's (`--backend ollama` on a job validated on the stand-in does not run the
stand-in's model)."""
JOB_DATA = ("prompt", "id_column")
"""What the pytest options take from the record: the job's rows and prompt. Backend, model and
server stay the command line's (a phase measures the server it is pointed at; `harness
validate` names each one)."""
FALLBACK = {"id_column": "id", "backend": "embedded"}
"""What `harness run` and `harness doctor` take when neither the caller nor a validated job sets
those options (their parsers leave them None, so that a record can fill them)."""
VALIDATED = "the validated job, harness.yaml jobs"
"""The source of a setting the validated job set."""


@dataclass(frozen=True, eq=False)
class Given(Mapping[str, Any]):
    """What one caller gave (a command line, or pytest's `--harness-*` options), frozen: a
    mapping from field name to value (None where the caller left an option out), the keyword
    arguments of `BatchOptions` / `ApiSettings`. Made by `given` and `from_pytest` alike."""

    command: str
    """`run`, `api`, `doctor`, `convert`, `validate` or `pytest`."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """Field name to value (read-only)."""
    from_validated: tuple[str, ...] = ()
    """The fields the validated job set (`with_validated_job`): the banner and the reports
    name them."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))

    def __getitem__(self, key: str) -> Any:
        return self.settings[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.settings)

    def __len__(self) -> int:
        return len(self.settings)

    def replaced(self, **values: Any) -> Given:
        """This `Given` with `values` set (a new one: a `Given` never changes)."""
        return Given(self.command, {**self.settings, **values}, self.from_validated)

    def with_validated_job(
        self, input: Path, config: Path | None = None, *, fields: tuple[str, ...] = RECORDED
    ) -> Given:
        """This `Given` with the job `harness validate` recorded for `input` (in `config`, else
        the `config` given, else harness.yaml) filling what the caller left out (None): of
        `fields`, those that belong to the record's backend only when the backend run is the
        record's (`SERVER_BOUND`). A batch JSONL has no validated job."""
        if input.suffix.lower() in (".jsonl", ".json"):
            return self
        record = find_job(config or self.settings.get("config") or DEFAULT_CONFIG_PATH, input)
        if record is None:
            return self
        out, used = dict(self.settings), list(self.from_validated)
        backend = out.get("backend") or record.backend
        for name in fields:
            value = getattr(record, name)
            if out.get(name) is not None or value is None:
                continue
            if name in SERVER_BOUND and backend != record.backend:
                continue
            out[name] = value
            used.append(name)
        return Given(self.command, out, tuple(used))

    def with_fallback(self, fallback: Mapping[str, Any] = FALLBACK) -> Given:
        """This `Given` with `fallback` where it still holds None."""
        return self.replaced(**{k: v for k, v in fallback.items() if self.settings.get(k) is None})

    def options(self) -> dict[str, Any]:
        """The keyword arguments of `BatchOptions`: the values and `from_validated`."""
        return {**self.settings, "from_validated": self.from_validated}


def given(args: argparse.Namespace, command: str, *names: str) -> Given:
    """The fields `command`'s options set (`names`, or all of them), read from parsed `args`
    and converted: keyword arguments of `BatchOptions` / `ApiSettings`."""
    return Given(command, {n: _BY_NAME[n].value(getattr(args, n)) for n in _names(command, names)})


def harness_options(*names: str) -> list[tuple[str, dict[str, Any]]]:
    """The `--harness-<flag>` options of `names` (none: every one the table gives pytest), as
    (flag, keywords) for `pytest.OptionGroup.addoption`; their types raise ValueError with the
    message (the plugin turns it into a usage error)."""
    out = []
    for name in _names(_PYTEST, names):
        o = _BY_NAME[name]
        kw = o.keywords(_PYTEST)
        kw["dest"] = f"harness_{o.name}"
        out.append((f"--harness-{o.flag.removeprefix('--')}", kw))
    return out


def from_pytest(option: Any) -> Given:
    """The settings the `--harness-*` options of the table gave (pytest's `config.option`),
    by field name, as parsed (None where an option was not given)."""
    return Given(_PYTEST, {o.name: getattr(option, f"harness_{o.name}", None) for o in OPTIONS
                           if _PYTEST in o.variants})  # fmt: skip
