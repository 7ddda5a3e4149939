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

from harness import __version__
from harness.backends.server import ServerSettings, serve
from harness.batch import BatchOptions, output_paths
from harness.config import DEFAULT_CONFIG_PATH
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
from harness.run.given import Formatter, Parser, add_options, count, given
from harness.run.options import with_validated_job

__all__ = ["main"]


def _add_serve(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run a llama.cpp server for a model on 127.0.0.1 and print its URL",
        formatter_class=Formatter,
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
        type=count,
        default=d.n_ctx,
        help="context size in tokens of ALL slots together (llama-server's -c; each slot gets "
        "ctx / parallel; `harness run --ctx` is per slot)",
    )
    p.add_argument("--parallel", type=count, default=d.parallel, help="server slots")
    p.add_argument("--host", default=d.host, help="address to listen on (loopback by default)")
    p.add_argument("--port", type=count, default=d.port, help="port; 0 picks a free one")
    p.add_argument("--threads", type=count, default=None, help="CPU threads (default: all cores)")
    p.add_argument(
        "--cache-type-k",
        default=d.cache_type_k,
        help="KV cache type of keys (f16, q8_0, q4_0, ...)",
    )
    p.add_argument("--cache-type-v", default=d.cache_type_v, help="KV cache type of values")
    p.add_argument(
        "--cache-ram-mib",
        type=count,
        default=None,
        help="llama.cpp host prompt cache in MiB (0: off; default: llama-server's, 8192)",
    )
    p.add_argument("--batch", type=count, default=d.n_batch, help="logical batch size")
    p.add_argument("--ubatch", type=count, default=d.n_ubatch, help="physical batch size")
    p.add_argument("--swa-full", action="store_true", help="full-size KV for sliding-window layers")
    p.add_argument(
        "--context-shift",
        action="store_true",
        help="when a sequence fills its context, drop old tokens instead of failing",
    )
    p.add_argument(
        "--keep", type=count, default=0, help="tokens a context shift keeps at the start"
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
  <stem>_scores.csv     your id column (custom_id for a batch file), the columns kept with
                        --keep-columns, score, other output fields, score_expected and score_p
                        (--score-mode logprobs), status, error, prompt_tokens, cached_tokens,
                        completion_tokens, latency_ms: one row per finished input row, appended
                        as each row finishes (open it at any time), in input order once the
                        run ends (also after Ctrl-C)
  <stem>_rejects.csv    with --on-bad-row skip: the bad rows set aside (line, id, reason)

Resume follows an edited CSV: rows appended to it run, finished rows are kept, a row changed
under a finished id stops the run before anything is sent (exit 2, naming it) unless
--rescore-changed.

Exit codes: 0 every row done; 1 rows failed or the server could not be reached; 2 bad input or
usage (nothing is created); 3 every good row done, bad rows set aside (--on-bad-row skip);
130 interrupted by Ctrl-C, 143 by SIGTERM (run the same command again to resume).
"""


def _add_convert(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser(
        "convert",
        help="turn a candidates CSV into an OpenAI Batch JSONL (one request per row)",
        formatter_class=Formatter,
        description="Writes one line per CSV row: {custom_id, method, url, body}, where body\n"
        "holds the messages (shared rubric + the rendered row), max_tokens, temperature 0, seed\n"
        "and the output schema as response_format. `harness run OUTPUT.jsonl` runs it.",
    )
    p.add_argument("input", metavar="INPUT.csv", help="candidates CSV with a header row")
    p.add_argument("output", metavar="OUTPUT.jsonl", help="batch file to write (replaced)")
    add_options(p, "convert", "id_column", "prompt", "sample", "seed", "max_tokens", "model")


def _cmd_convert(args: argparse.Namespace) -> int:
    from harness.batch import convert

    result = convert(args.input, args.output, **given(args, "convert"))
    print(
        f"convert: wrote {result.lines} batch lines (of {result.rows} rows) to {result.output} "
        f"using the prompt {result.prompt}"
    )
    return 0


def _add_generate(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser(
        "generate",
        help="write a CSV of synthetic candidates (to try the pipeline, or load-test it)",
        formatter_class=Formatter,
        description="Writes ROWS synthetic candidates (~100 tokens each: id, name, title,\n"
        "years, skills, education, location, summary), reproducible from --seed, in the\n"
        "columns the default prompt expects. `harness run OUTPUT.csv` scores them.",
    )
    p.add_argument("rows", type=count, metavar="ROWS", help="how many candidates")
    p.add_argument("output", metavar="OUTPUT.csv", help="CSV file to write (replaced)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator")


def _cmd_generate(args: argparse.Namespace) -> int:
    from harness.workload import write_candidates_csv

    if Path(args.output).is_dir():
        raise ConfigError(f"{args.output} is a directory; give a file name such as x.csv")
    path = write_candidates_csv(args.output, args.rows, seed=args.seed)
    print(f"generate: wrote {args.rows} candidates to {path} (seed {args.seed})")
    return 0


def _add_doctor(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser(
        "doctor",
        help="check a setup before a long run: server, model, context, cached tokens, GPU, disk",
        formatter_class=Formatter,
        description="Checks, one line each (ok / FAIL / note), with what to fix:\n"
        "  the server answers and has the model; one request's context holds the rubric, the\n"
        "  longest candidate and the reply with a 20% margin; the server reports cached prompt\n"
        "  tokens; an NVIDIA GPU is visible (for a server on this machine); there is disk room\n"
        "  for the results. INPUT is your candidates CSV (default: 200 generated ones).\n"
        "Exit 0 when nothing failed, 1 otherwise.",
    )
    p.add_argument("input", nargs="?", default=None, metavar="INPUT", help="candidates CSV")
    add_options(p, "doctor", *_DOCTOR_OPTIONS)


_DOCTOR_OPTIONS = ("backend", "model", "base_url", "ctx", "id_column", "prompt", "sample", "seed",
                   "max_tokens", "config")  # fmt: skip


def _cmd_doctor(args: argparse.Namespace) -> int:
    import tempfile

    from harness.doctor import doctor
    from harness.workload import write_candidates_csv

    with tempfile.TemporaryDirectory(prefix="harness-doctor-") as tmp:
        src = Path(args.input) if args.input else write_candidates_csv(Path(tmp) / "c.csv", 200)
        got = given(args, "doctor")
        # INPUT's validated job (harness.yaml `jobs`) fills what the command line left out, as
        # for `harness run`: doctor checks the job that run would send.
        kw = with_validated_job(src, got) if args.input else got.with_fallback().options()
        options = BatchOptions(input=src, progress=False, **kw)
        options.validate()
        if options.from_validated:
            print(f"doctor: {', '.join(options.from_validated)} from the validated job "
                  f"({options.config}, jobs)")  # fmt: skip
        checks = doctor(options)
    for check in checks:
        print(check.line())
    failed = [c for c in checks if c.status == "FAIL"]
    print(f"doctor: {len(failed)} of {len(checks)} checks failed" if failed else "doctor: all ok")
    return 1 if failed else 0


def _add_plan(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser(
        "plan",
        help="how many servers the next job needs, from the scale reports measured",
        formatter_class=Formatter,
        description="Reads the largest finished scale report that passed its criteria and was\n"
        "measured (performance_benchmarks_<N>.*.json; no test double, no replay) of the asked\n"
        "model, backend and strategy and prints the servers of that kind the job needs by the\n"
        "deadline (per-server throughput; a pool run's measured scaling efficiency when there\n"
        "is one), its time, energy and cost, each with its report, then the verdict on the\n"
        "same folder (harness verdict's reasons, word for word, when it is not GO). Exit 2\n"
        "when no report matches (it lists the ones it has, and why others cannot be used).",
    )
    p.add_argument("--rows", type=count, required=True, help="rows of the job")
    p.add_argument("--deadline", required=True, help="e.g. 24h, 90m, 2d")
    p.add_argument("--model", default=None, help="the model measured (default: any)")
    p.add_argument("--backend", default=None, help="the backend measured (default: any)")
    p.add_argument("--strategy", default=None, help="the strategy measured (default: any)")
    p.add_argument("--price-per-kwh", type=float, default=0.30, help="electricity price")
    p.add_argument("--report-dir", default="reports", help="where the reports are")
    p.add_argument(
        "--config", default="harness.yaml",
        help="the run's configuration file (for the verdict printed below the plan)",
    )  # fmt: skip
    p.add_argument(
        "--prompt", default=None,
        help="the prompt file harness run will send, for the verdict (default: the packaged "
        "rubric, as harness run)",
    )  # fmt: skip


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
        config_path=Path(args.config),
        prompt=Path(args.prompt) if args.prompt else None,
    )
    for line in result.lines(args.price_per_kwh):
        print(line)
    return 0


def _add_labels(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser(
        "labels",
        help="write a sheet of your rows to score by hand (for harness agree)",
        formatter_class=Formatter,
        description="Writes <INPUT stem>_labels.csv: a seeded random sample of INPUT's rows (in\n"
        "input order, every column kept) with an empty human_score column (one per rater with\n"
        "--raters N: human_score, human_score_2, ...). Score the rows on the job's scale, then\n"
        "run harness agree on the sheet and the run's results. An existing sheet is never\n"
        "overwritten.",
    )
    p.add_argument("input", metavar="INPUT.csv", help="the candidates CSV harness run scores")
    p.add_argument("--sample", type=count, default=200, help="rows to label (default 200: by the "
                   "usual analytic width, not measured here, a 95%% CI about ±0.1 on a κ near "
                   "0.6; 50 give about ±0.2; harness agree says what yours needs)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    p.add_argument("--id-column", default="id", help="the CSV's id column (default: id)")
    p.add_argument("--raters", type=count, default=1, help="score columns, one per rater")
    p.add_argument("--output", default=None, help="the sheet (default: <INPUT stem>_labels.csv)")


def _cmd_labels(args: argparse.Namespace) -> int:
    from harness.labels import write_sheet

    path, n, total = write_sheet(
        Path(args.input),
        sample=args.sample,
        seed=args.seed,
        id_column=args.id_column,
        raters_n=args.raters,
        output=Path(args.output) if args.output else None,
    )
    print(f"labels: {n} of {total} rows (seed {args.seed}) in {path}: fill in human_score")
    return 0


def _add_agree(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser(
        "agree",
        help="how far the model's scores agree with your hand-scored sheet",
        formatter_class=Formatter,
        description="Reads the sheet harness labels wrote, filled in, and the model's scores:\n"
        "a harness run results file (.jsonl), a scores CSV, or the sheet's own score column.\n"
        "Prints, over the rows with both scores: exact agreement, within ±1, mean absolute\n"
        "error, quadratic-weighted Cohen's κ, Spearman ρ and Kendall τ (of the expected score\n"
        "too in logprobs mode), each with a seeded bootstrap 95% CI and its n (under 10 rows:\n"
        "n/a, with the reason); with several raters their agreement with each other (the\n"
        "ceiling); the confusion matrix; the largest disagreements; the labels a CI of\n"
        "--ci-width needs.",
    )
    p.add_argument("labels", metavar="LABELS.csv", help="the filled sheet")
    p.add_argument("results", metavar="RESULTS", nargs="?", default=None,
                   help="the run's <stem>_results.jsonl or <stem>_scores.csv")  # fmt: skip
    p.add_argument("--id-column", default="id", help="the sheet's id column (default: id)")
    p.add_argument("--scale", default="1-10", help="the score scale, LOW-HIGH (default 1-10)")
    p.add_argument("--ci-width", type=float, default=0.1, help="the κ CI width to plan for")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def _cmd_agree(args: argparse.Namespace) -> int:
    import json

    from harness.labels import agree_files, parse_scale

    result = agree_files(
        Path(args.labels),
        Path(args.results) if args.results else None,
        id_column=args.id_column,
        scale=parse_scale(args.scale),
        ci_width=args.ci_width,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for line in result.lines():
            print(line)
    return 0


def _add_verdict(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser(
        "verdict",
        help="GO / NO-GO for the production run, from a reports folder (runs nothing)",
        formatter_class=Formatter,
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


def _add_validate(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser(
        "validate",
        help="run the phases on your own CSV and prompt, then print the verdict",
        formatter_class=Formatter,
        description="Runs the phases the profile needs (context limits, scale 100 and 1K,\n"
        "quality, reliability; scale 10K too on a production backend) on YOUR job: each phase\n"
        "draws its rows from INPUT (a seeded sample; cycled, each repeat marked, when the phase\n"
        "is larger) and sends your prompt. Each phase is a pytest command, printed before it\n"
        "runs (CI can run the very same). A phase with a fresh passing report of this job in\n"
        "--report-dir is skipped, so an interrupted validation goes on where it stopped when run\n"
        "again. Ends with the verdict. Exit 0 when every phase passed, 1 when one failed, 2 for\n"
        "a bad input or option, 130 when interrupted.",
    )
    p.add_argument("input", metavar="INPUT", help="your candidates CSV")
    add_options(p, "validate")
    p.add_argument(
        "--report-dir", default="reports", metavar="DIR", help="where the phases write reports"
    )
    p.add_argument(
        "--phases",
        default=None,
        metavar="LIST",
        help="comma list of the phases to run, by marker (context_limits, scale_100, scale_1k, "
        "scale_10k, quality, reliability); default: the profile's",
    )
    p.add_argument("--dry-run", action="store_true", help="print each phase's command; run nothing")


def _cmd_validate(args: argparse.Namespace) -> int:
    from harness.validate import ValidateOptions, validate

    got = given(args, "validate")
    opts = ValidateOptions(
        input=Path(args.input),
        prompt=got["prompt"],
        id_column=got["id_column"],
        backend=got["backend"],
        model=got["model"],
        base_url=got["base_url"],
        profile=got["profile"],
        threads=got["threads"],
        config=(got["config"] or DEFAULT_CONFIG_PATH).resolve(),  # where the user stands
        report_dir=Path(args.report_dir).resolve(),  # where the user stands, as INPUT
        phases=tuple(m.strip() for m in args.phases.split(",") if m.strip())
        if args.phases
        else None,
        dry_run=args.dry_run,
    )
    try:
        return validate(opts, root=Path(__file__).resolve().parent.parent)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _add_run(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser(
        "run",
        help="score a CSV or run a batch JSONL; resumable; writes a scores CSV",
        formatter_class=Formatter,
        description=_RUN_DESCRIPTION,
    )
    p.add_argument("input", metavar="INPUT", help="candidates CSV, or batch .jsonl/.json")
    add_options(p, "run")  # every option of `harness run`, declared in harness.run.given


def _cmd_run(args: argparse.Namespace) -> int:
    from harness.batch import run_batch

    options = BatchOptions(
        input=Path(args.input), **with_validated_job(Path(args.input), given(args, "run"))
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
    parser = Parser(
        prog="harness",
        description="Validate a large local LLM batch job, then run it.",
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_convert(sub)
    _add_generate(sub)
    _add_run(sub)
    _add_validate(sub)
    _add_doctor(sub)
    _add_plan(sub)
    _add_verdict(sub)
    _add_labels(sub)
    _add_agree(sub)
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
    "validate": _cmd_validate,
    "doctor": _cmd_doctor,
    "plan": _cmd_plan,
    "verdict": _cmd_verdict,
    "labels": _cmd_labels,
    "agree": _cmd_agree,
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
