"""The `harness` command: `serve` a model, `convert` a CSV to batch JSONL, `generate` synthetic
candidates, `run` a batch, `doctor` a setup, `api`: OpenAI's Batch API over the engine.

Exit codes: 0 all done; 1 finished with failed rows, or the server could not be reached;
2 bad input or usage, or another `harness run` writes the same results (one line on stderr,
nothing created); 130 interrupted by Ctrl-C.
The logic of `convert` and `run` lives in `harness.batch`; this module only parses options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from harness import __version__
from harness.backends.server import ServerSettings, serve
from harness.batch import DEFAULT_SEED, BatchOptions, output_paths
from harness.engine.store import read_results
from harness.errors import (
    BackendError,
    ConfigError,
    HarnessError,
    InputError,
    LockHeld,
    OutputError,
)
from harness.models.registry import DEFAULT_MODEL, KNOWN_MODELS
from harness.workload import DEFAULT_PROMPT_PATH

__all__ = ["main"]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        # No "(default: None)": options without a default say in their help what happens.
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line on stderr (exit 2), pointing at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return value


def _add_serve(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run a llama.cpp server for a model on 127.0.0.1 and print its URL",
        formatter_class=_Formatter,
        description="Run llama.cpp's own server (xllamacpp, CPU) until Ctrl-C or SIGTERM.\n"
        "Prints `harness serve: listening on URL` once it is up.",
    )
    d = ServerSettings()
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model name ({', '.join(KNOWN_MODELS)}) or a path to a .gguf file",
    )
    p.add_argument(
        "--ctx",
        type=_positive_int,
        default=d.n_ctx,
        help="context size in tokens of ALL slots together (llama-server's -c; each slot gets "
        "ctx / parallel; `harness run --ctx` is per slot)",
    )
    p.add_argument("--parallel", type=_positive_int, default=d.parallel, help="server slots")
    p.add_argument("--host", default=d.host, help="address to listen on (loopback by default)")
    p.add_argument("--port", type=_positive_int, default=d.port, help="port; 0 picks a free one")
    p.add_argument(
        "--threads", type=_positive_int, default=None, help="CPU threads (default: all cores)"
    )
    p.add_argument(
        "--cache-type-k",
        default=d.cache_type_k,
        help="KV cache type of keys (f16, q8_0, q4_0, ...)",
    )
    p.add_argument("--cache-type-v", default=d.cache_type_v, help="KV cache type of values")
    p.add_argument(
        "--cache-ram-mib",
        type=_positive_int,
        default=None,
        help="llama.cpp host prompt cache in MiB (0: off; default: llama-server's, 8192)",
    )
    p.add_argument("--batch", type=_positive_int, default=d.n_batch, help="logical batch size")
    p.add_argument("--ubatch", type=_positive_int, default=d.n_ubatch, help="physical batch size")
    p.add_argument("--swa-full", action="store_true", help="full-size KV for sliding-window layers")
    p.add_argument(
        "--context-shift",
        action="store_true",
        help="when a sequence fills its context, drop old tokens instead of failing",
    )
    p.add_argument(
        "--keep", type=_positive_int, default=0, help="tokens a context shift keeps at the start"
    )
    p.add_argument(
        "--flash-attn", default=d.flash_attn, choices=["auto", "on", "off"], help="flash attention"
    )
    p.add_argument(
        "--flags",
        default=d.flags,
        choices=["harness", "ollama"],
        help="label of the launch mode these flags make (reports show it)",
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = ServerSettings(
        model=args.model,
        n_ctx=args.ctx,
        parallel=args.parallel,
        host=args.host,
        port=args.port,
        threads=args.threads,
        cache_type_k=args.cache_type_k,
        cache_type_v=args.cache_type_v,
        cache_ram_mib=args.cache_ram_mib,
        n_batch=args.batch,
        n_ubatch=args.ubatch,
        swa_full=args.swa_full,
        ctx_shift=args.context_shift,
        n_keep=args.keep,
        flash_attn=args.flash_attn,
        flags=args.flags,
    )
    settings.validate()
    return serve(settings)


_RUN_DESCRIPTION = """\
Score a candidates CSV, or run an OpenAI Batch JSONL, through a model server.

INPUT ending in .jsonl or .json is a batch file: each line is sent as its body says (its own
messages and parameters). Anything else is a CSV with a header: each row becomes the shared
rubric (--prompt) plus the row rendered into the prompt's user template, and the reply is asked
for as structured output (--structured).

Outputs (next to INPUT, or next to --output):
  <stem>_results.jsonl  every finished request, OpenAI Batch output lines plus a `harness`
                        object; running the same command again resumes from it (finished ids,
                        errors included, are skipped)
  <stem>_scores.csv     custom_id, score, other output fields, score_expected, score_p (with
                        --score-mode logprobs), status, error, prompt_tokens, cached_tokens,
                        completion_tokens, latency_ms: one row per input row in input order,
                        rewritten at the end of every run (also after Ctrl-C)

Exit codes: 0 every row done; 1 rows failed or the server could not be reached; 2 bad input or
usage (nothing is created); 130 interrupted by Ctrl-C (run the same command again to resume).
"""


def _add_convert(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "convert",
        help="turn a candidates CSV into an OpenAI Batch JSONL (one request per row)",
        formatter_class=_Formatter,
        description="Writes one line per CSV row: {custom_id, method, url, body}, where body\n"
        "holds the messages (shared rubric + the rendered row), max_tokens, temperature 0, seed\n"
        "and the output schema as response_format. `harness run OUTPUT.jsonl` runs it.",
    )
    p.add_argument("input", metavar="INPUT.csv", help="candidates CSV with a header row")
    p.add_argument("output", metavar="OUTPUT.jsonl", help="batch file to write (replaced)")
    _add_input_options(p)
    p.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=None,
        help="max_tokens of each request (default: what the prompt's output schema needs)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="body.model of each line (OpenAI's Batch API requires it; `harness run` uses its "
        "own --model)",
    )


def _add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--id-column",
        default="id",
        help="CSV column holding each row's unique id (becomes custom_id)",
    )
    p.add_argument(
        "--prompt",
        default=None,
        metavar="PROMPT.yaml",
        help="prompt file (system, user_template with {column} placeholders, output_schema) "
        f"for CSV input (default: the recruiter rubric, "
        f"{DEFAULT_PROMPT_PATH.parent.parent.name}/prompts/{DEFAULT_PROMPT_PATH.name})",
    )
    p.add_argument(
        "--sample",
        type=_positive_int,
        default=None,
        metavar="N",
        help="use a reproducible sample of N rows (drawn with --seed), kept in input order "
        "(default: every row)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="seed of the --sample draw and of each request's sampling (`seed` in the body)",
    )


def _cmd_convert(args: argparse.Namespace) -> int:
    from harness.batch import convert

    result = convert(
        args.input,
        args.output,
        id_column=args.id_column,
        prompt=args.prompt,
        sample=args.sample,
        seed=args.seed,
        max_tokens=args.max_tokens,
        model=args.model,
    )
    print(
        f"convert: wrote {result.lines} batch lines (of {result.rows} rows) to {result.output} "
        f"using the prompt {result.prompt}"
    )
    return 0


def _add_generate(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "generate",
        help="write a CSV of synthetic candidates (to try the pipeline, or load-test it)",
        formatter_class=_Formatter,
        description="Writes ROWS synthetic candidates (~100 tokens each: id, name, title,\n"
        "years, skills, education, location, summary), reproducible from --seed, in the\n"
        "columns the default prompt expects. `harness run OUTPUT.csv` scores them.",
    )
    p.add_argument("rows", type=_positive_int, metavar="ROWS", help="how many candidates")
    p.add_argument("output", metavar="OUTPUT.csv", help="CSV file to write (replaced)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator")


def _cmd_generate(args: argparse.Namespace) -> int:
    from harness.workload import write_candidates_csv

    if Path(args.output).is_dir():
        raise ConfigError(f"{args.output} is a directory; give a file name such as x.csv")
    path = write_candidates_csv(args.output, args.rows, seed=args.seed)
    print(f"generate: wrote {args.rows} candidates to {path} (seed {args.seed})")
    return 0


def _add_doctor(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "doctor",
        help="check a setup before a long run: server, model, context, cached tokens, GPU, disk",
        formatter_class=_Formatter,
        description="Checks, one line each (ok / FAIL / note), with what to fix:\n"
        "  the server answers and has the model; one request's context holds the rubric, the\n"
        "  longest candidate and the reply with a 20% margin; the server reports cached prompt\n"
        "  tokens; an NVIDIA GPU is visible (for a server on this machine); there is disk room\n"
        "  for the results. INPUT is your candidates CSV (default: 200 generated ones).\n"
        "Exit 0 when nothing failed, 1 otherwise.",
    )
    p.add_argument("input", nargs="?", default=None, metavar="INPUT", help="candidates CSV")
    p.add_argument("--backend", default="embedded", help="embedded | openai | ollama")
    p.add_argument("--model", default=None, help="the model (default: the backend's)")
    p.add_argument("--base-url", default=None, metavar="URL", help="the server's URL")
    p.add_argument("--ctx", type=_positive_int, default=None, metavar="N",
                   help="context of one request (default: as harness run resolves it)")  # fmt: skip
    _add_input_options(p)
    p.add_argument("--max-tokens", type=_positive_int, default=16, metavar="N")
    p.add_argument("--config", default="harness.yaml", metavar="harness.yaml")


def _cmd_doctor(args: argparse.Namespace) -> int:
    import tempfile

    from harness.doctor import doctor
    from harness.workload import write_candidates_csv

    with tempfile.TemporaryDirectory(prefix="harness-doctor-") as tmp:
        src = Path(args.input) if args.input else write_candidates_csv(Path(tmp) / "c.csv", 200)
        options = BatchOptions(
            input=src,
            backend=args.backend,
            model=args.model,
            base_url=args.base_url,
            ctx=args.ctx,
            id_column=args.id_column,
            prompt=Path(args.prompt) if args.prompt else None,
            sample=args.sample,
            seed=args.seed,
            max_tokens=args.max_tokens,
            config=Path(args.config),
            progress=False,
        )
        options.validate()
        checks = doctor(options)
    for check in checks:
        print(check.line())
    failed = [c for c in checks if c.status == "FAIL"]
    print(f"doctor: {len(failed)} of {len(checks)} checks failed" if failed else "doctor: all ok")
    return 1 if failed else 0


def _add_plan(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "plan",
        help="how many servers the next job needs, from the scale reports measured",
        formatter_class=_Formatter,
        description="Reads the largest finished scale report that passed its criteria and was\n"
        "measured (performance_benchmarks_<N>.*.json; no test double, no replay) of the asked\n"
        "model, backend and strategy and prints the servers of that kind the job needs by the\n"
        "deadline (per-server throughput; a pool run's measured scaling efficiency when there\n"
        "is one), its time, energy and cost, each with its report. Exit 2 when no report\n"
        "matches (it lists the ones it has, and why others cannot be used).",
    )
    p.add_argument("--rows", type=_positive_int, required=True, help="rows of the job")
    p.add_argument("--deadline", required=True, help="e.g. 24h, 90m, 2d")
    p.add_argument("--model", default=None, help="the model measured (default: any)")
    p.add_argument("--backend", default=None, help="the backend measured (default: any)")
    p.add_argument("--strategy", default=None, help="the strategy measured (default: any)")
    p.add_argument("--price-per-kwh", type=float, default=0.30, help="electricity price")
    p.add_argument("--report-dir", default="reports", help="where the reports are")


def _cmd_plan(args: argparse.Namespace) -> int:
    from harness.plan import parse_duration, plan

    result = plan(
        Path(args.report_dir),
        rows=args.rows,
        deadline_s=parse_duration(args.deadline),
        model=args.model,
        backend=args.backend,
        strategy=args.strategy,
        price_per_kwh=args.price_per_kwh,
    )
    for line in result.lines(args.price_per_kwh):
        print(line)
    return 0


def _add_verdict(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "verdict",
        help="GO / NO-GO for the production run, from a reports folder (runs nothing)",
        formatter_class=_Formatter,
        description="Reads every phase report in REPORT_DIR and prints the verdict for the\n"
        "production profile (gpu-gemma3-12b: Ollama, gemma3:12b): GO only when every phase\n"
        "passed and measured what will run (that model and backend, one server and its\n"
        "flags, the prompt harness run sends, harness.yaml's settings now, this harness\n"
        "version; never a test double or a replay). It prints the reports it read (date,\n"
        "harness version, commit), the settings to run with and the 170K projection.\n"
        "Exit 0 for GO; 1 for NO-GO, incomplete or not measured for production; 2 when the\n"
        "folder cannot be read. A CI job gates on it: `harness verdict reports`.",
    )
    p.add_argument(
        "report_dir", nargs="?", default="reports", metavar="REPORT_DIR",
        help="the folder pytest wrote its reports to",
    )  # fmt: skip
    p.add_argument("--config", default="harness.yaml", help="the run's configuration file")
    p.add_argument(
        "--prompt", default=None,
        help="the prompt file harness run will send (default: the packaged rubric, as harness "
        "run)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")


def _cmd_verdict(args: argparse.Namespace) -> int:
    import json

    from harness.verdict import check_folder, verdict

    folder = Path(args.report_dir)
    check_folder(folder)
    result = verdict(folder, Path(args.config), prompt=Path(args.prompt) if args.prompt else None)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for line in result.lines():
            print(line)
    return result.exit_code


def _add_run(sub: argparse._SubParsersAction[_Parser]) -> None:
    from harness.backends import Backend
    from harness.batch import EXECUTORS
    from harness.engine.strategies import STRATEGIES
    from harness.run.options import add_server_options
    from harness.workload import STRUCTURED_MODES

    d = BatchOptions(Path("-"))
    p = sub.add_parser(
        "run",
        help="score a CSV or run a batch JSONL; resumable; writes a scores CSV",
        formatter_class=_Formatter,
        description=_RUN_DESCRIPTION,
    )
    p.add_argument("input", metavar="INPUT", help="candidates CSV, or batch .jsonl/.json")
    p.add_argument(
        "--output",
        default=None,
        metavar="OUT.csv",
        help="scores CSV to write; the results go next to it as <OUT stem>_results.jsonl "
        "(default: <INPUT stem>_scores.csv next to INPUT)",
    )
    p.add_argument(
        "--backend", default=d.backend, help=f"model server: {' | '.join(Backend.runnable())}"
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"embedded: {', '.join(KNOWN_MODELS)} or a .gguf path (default {DEFAULT_MODEL}); "
        "ollama: a tag (default gemma3:12b); openai: the served model (default: the server's "
        "first)",
    )
    p.add_argument(
        "--base-url",
        action="append",
        default=None,
        metavar="URL",
        help="server URL for --backend openai (default: $OPENAI_BASE_URL; e.g. "
        "http://127.0.0.1:8080/v1) or ollama (default: $OLLAMA_HOST or http://127.0.0.1:11434). "
        "Several (the option again, or a comma list) run one job over all of them: each worker "
        "stays on one server (its conversation and prefix cache with it), rows go to whichever "
        "worker is free, and a server that dies is taken out (its rows go to the others)",
    )
    p.add_argument(
        "--servers",
        type=_positive_int,
        default=d.servers,
        metavar="N",
        help="embedded servers to start, each with --threads threads and --concurrency slots; "
        "more than one runs one job over all of them (as several --base-url do)",
    )
    p.add_argument(
        "--executor",
        default=d.executor,
        choices=list(EXECUTORS),
        help="who runs the engine: this process (local), or a Ray Data pipeline of actors, one "
        "per server, with this process writing the results (ray; needs the `ray` extra)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="the Ray cluster for --executor ray (default: start a local instance)",
    )
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        default=None,
        metavar="N",
        help="requests in flight, per server when there are several (the embedded server gets "
        "N slots of --ctx tokens each) (default: harness.yaml's CONCURRENCY, else 1)",
    )
    p.add_argument(
        "--strategy",
        default=None,
        help=f"{' | '.join(sorted(STRATEGIES, reverse=True))}: one request per row with the "
        "shared rubric (the server's prefix cache reuses it), or rolling conversations "
        "restarted by the trim policy (default: harness.yaml's STRATEGY, else stateless)",
    )
    add_server_options(p)
    _add_input_options(p)
    p.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=None,
        metavar="N",
        help="tokens per reply for CSV input (batch lines carry their own) (default: what the "
        "prompt's output schema needs: its longest answer + 8, 256 when a field is free text)",
    )
    p.add_argument(
        "--structured",
        default=d.structured,
        help=f"{' | '.join(STRUCTURED_MODES)}: how CSV replies are held to the output schema: "
        "a tight GBNF grammar (llama.cpp; others get the schema), JSON-schema structured "
        "output, free text parsed afterwards (unconstrained), or free text not parsed (none). "
        "A reply that does not parse is retried once, then recorded as the row's error",
    )
    p.add_argument(
        "--score-mode",
        default=None,
        choices=["decode", "logprobs"],
        help="decode: the model writes each reply; logprobs: the reply's JSON is sent written "
        "up to the score, and the score is read from the model's probabilities in one step "
        "(score, score_expected, score_p; needs llama.cpp or Ollama >= 0.12.11 and an output "
        "schema whose first field is an integer range or an enum, else rows are decoded and the "
        "banner says why) (default: harness.yaml's SCORE_MODE, which the performance phase "
        "writes only where both modes gave the same scores; else decode)",
    )
    p.add_argument(
        "--ctx",
        type=_positive_int,
        default=None,
        metavar="N",
        help="context window of ONE request in tokens (one server slot; Ollama's num_ctx); a "
        "longer request is recorded as that row's error, not sent (default: harness.yaml's "
        "n_ctx from phase 1; Ollama: the context it loaded the model with; else 8192)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="CPU threads of each embedded server (default: every core; with --servers N, the "
        "cores shared among them, at least 1 each; on a machine shared with other busy "
        "processes, fewer threads avoid llama.cpp's spin-waiting)",
    )
    p.add_argument(
        "--config",
        default=str(d.config),
        metavar="harness.yaml",
        help="measured configuration: its MAX_CONTEXT_TOKENS, CONTEXT_TRIM_THRESHOLD and "
        "TRIM_INTERVAL set the trim policy when present (written by --write-config)",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="profile of the config file (default: gpu-gemma3-12b for ollama, else embedded)",
    )
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="send again the rows whose last result is an error; each id still ends once in "
        "the scores (the latest result wins; the results file marks the retry)",
    )
    p.add_argument(
        "--stop-on-cache-miss",
        action="store_true",
        help="stop at the first reuse alarm: a window of 50 rows whose server computed more "
        "than twice the prompt tokens the strategy expects (it stopped reusing the rubric); "
        "finished rows are kept, the same command resumes. Without it the alarm is printed "
        "and recorded in the results, and the run goes on",
    )
    p.add_argument(
        "--new",
        action="store_true",
        help="start over when the results file belongs to another job (another prompt, model, "
        "strategy, ...): the old results are kept under a new name",
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar or progress lines on stderr",
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from harness.batch import run_batch

    options = BatchOptions(
        input=Path(args.input),
        output=Path(args.output) if args.output else None,
        backend=args.backend,
        model=args.model,
        base_url=",".join(args.base_url) if args.base_url else None,
        servers=args.servers,
        executor=args.executor,
        ray_address=args.ray_address,
        concurrency=args.concurrency,
        strategy=args.strategy,
        sample=args.sample,
        prompt=Path(args.prompt) if args.prompt else None,
        id_column=args.id_column,
        max_tokens=args.max_tokens,
        structured=args.structured,
        ctx=args.ctx,
        request_path=args.request_path,
        server_flags=args.server_flags,
        score_mode=args.score_mode,
        seed=args.seed,
        threads=args.threads,
        progress=args.progress,
        config=Path(args.config),
        profile=args.profile,
        retry_failed=args.retry_failed,
        new=args.new,
        stop_on_cache_miss=args.stop_on_cache_miss,
    )
    try:
        result = run_batch(options)
    except BackendError as exc:
        _, results = output_paths(options.input, options.output)
        kept = sum(1 for _ in read_results(results)) if results.exists() else 0
        print(f"harness run: error: {exc}", file=sys.stderr)
        if kept:
            print(
                f"harness run: {kept} results kept in {results}; run the same command again "
                "to resume",
                file=sys.stderr,
            )
        return 1
    if result.foreign:
        print(
            f"harness run: note: {result.foreign} lines of {result.results_path} are for ids "
            "not in this input; they are not in the scores CSV",
            file=sys.stderr,
        )
    print(result.summary())
    for line in result.endpoint_lines():
        print(line)
    if result.interrupted or result.stopped_reason:
        what = "interrupted" if result.interrupted else "stopped on a reuse alarm"
        print(
            f"{what}: {result.done + result.failed} results kept in {result.results_path}; "
            "run the same command again to resume",
            file=sys.stderr,
        )
    return result.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="harness",
        description="Validate a large local LLM batch job, then run it.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_convert(sub)
    _add_generate(sub)
    _add_run(sub)
    _add_doctor(sub)
    _add_plan(sub)
    _add_verdict(sub)
    sub.add_parser(
        "api",
        help="serve OpenAI's Files and Batches API over the engine on 127.0.0.1 "
        "(`harness api --help`)",
        add_help=False,
    )
    return parser


_COMMANDS = {
    "serve": _cmd_serve,
    "convert": _cmd_convert,
    "generate": _cmd_generate,
    "run": _cmd_run,
    "doctor": _cmd_doctor,
    "plan": _cmd_plan,
    "verdict": _cmd_verdict,
}


def main(argv: Sequence[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else list(argv)
    if args_list[:1] == ["api"]:
        # `harness api` has its own parser (harness.api.cli): the service's options.
        from harness.api import main as api_main

        return api_main(args_list[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(args_list)
    if extra:  # reported by the subcommand's parser: its name and its --help
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _COMMANDS[args.command](args)
    except (InputError, ConfigError, LockHeld) as exc:
        print(f"harness {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OutputError as exc:
        print(f"harness {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BackendError as exc:
        print(f"harness {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except HarnessError as exc:
        print(f"harness {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = "; run the same command again to resume" if args.command == "run" else ""
        print(f"harness {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
