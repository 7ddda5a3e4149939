"""The `harness` command: `serve` a model, `convert` a CSV to batch JSONL, `run` a batch.

Exit codes: 0 all done; 1 finished with failed rows, or the server could not be reached;
2 bad input or usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from harness import __version__
from harness.backends.server import ServerSettings, serve
from harness.errors import BackendError, ConfigError, HarnessError, InputError, OutputError
from harness.models.registry import DEFAULT_MODEL, KNOWN_MODELS

__all__ = ["main"]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return value


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        help="context size in tokens (all slots together)",
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
        default=d.cache_ram_mib,
        help="llama.cpp host prompt cache in MiB (0: off)",
    )
    p.add_argument("--batch", type=_positive_int, default=d.n_batch, help="logical batch size")
    p.add_argument("--ubatch", type=_positive_int, default=d.n_ubatch, help="physical batch size")
    p.add_argument("--swa-full", action="store_true", help="full-size KV for sliding-window layers")


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
    )
    settings.validate()
    return serve(settings)


def _add_smoke(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "smoke",
        help="a quick real run: N requests sharing the ~4,000-token rubric (embedded default)",
        formatter_class=_Formatter,
        description="Starts the embedded llama.cpp server, sends N synthetic candidates with the\n"
        "default recruiter rubric as a shared system prompt, and prints throughput and the\n"
        "server-reported prefix-cache savings beside their theoretical maximum.",
    )
    p.add_argument("-n", "--requests", type=_positive_int, default=50, help="requests to send")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or .gguf path")
    p.add_argument("--max-tokens", type=_positive_int, default=8, help="tokens per reply")


def _cmd_smoke(args: argparse.Namespace) -> int:
    import asyncio

    from harness.backends.embedded import EmbeddedBackend
    from harness.engine import JobSpec, run_job
    from harness.workload import CandidateTable, generate_candidates, items_from_table, load_prompt

    rows = tuple(generate_candidates(args.requests, seed=0))
    table = CandidateTable("generated", tuple(rows[0]), "id", rows, tuple(range(2, len(rows) + 2)))
    items = items_from_table(table, load_prompt(), max_tokens=args.max_tokens, structured="none")

    async def go() -> int:
        async with EmbeddedBackend(args.model, n_ctx=8192) as backend:
            result = await run_job(backend, items, JobSpec(desc="smoke"))
        m = result.metrics
        sav, theory = m.token_savings or 0.0, m.token_savings_theoretical_max or 0.0
        print(
            f"smoke: {m.completed}/{m.requests} requests on {args.model} (embedded llama.cpp, CPU) "
            f"in {m.elapsed_s:.1f} s: {m.throughput_rps:.2f} req/s; server-reported token "
            f"savings {sav:.1%} of prompt tokens (theoretical maximum {theory:.1%}); "
            f"latency p50 {m.latency_ms.p50 or 0:.0f} ms; errors {m.errors}"
        )
        return 0 if m.errors == 0 else 1

    return asyncio.run(go())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness",
        description="Validate a large local LLM batch job, then run it.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_smoke(sub)
    return parser


_COMMANDS = {"serve": _cmd_serve, "smoke": _cmd_smoke}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (InputError, ConfigError) as exc:
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
        print(f"harness {args.command}: interrupted", file=sys.stderr)
        return 130
