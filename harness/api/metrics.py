"""`GET /metrics`: the service in Prometheus' text exposition format (version 0.0.4).

Per batch (label `batch`): requests by outcome, prompt / cached / completion tokens, and for the
batch running now its rate and ETA. Cached tokens are given only for batches whose server
reported them (an unknown figure is absent, never 0), with `harness_api_batch_cached_coverage`:
the share of completed requests that reported it, labelled with where it came from. Service-wide:
batches by status, files, pass-through requests (and those refused), refused uploads and
bodies, unauthorized requests, foreign callers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from harness.api.page import BatchView
from harness.api.service import Counters

__all__ = ["CONTENT_TYPE", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(
    name: str, kind: str, help_: str, samples: Iterable[tuple[dict[str, str], float]]
) -> list[str]:
    out = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        out.append(f"{name}{{{text}}} {value:g}" if text else f"{name} {value:g}")
    return out


def render_metrics(
    views: Sequence[BatchView], statuses: dict[str, int], files: int, counters: Counters
) -> str:
    """The exposition text."""
    lines: list[str] = []
    lines += _family(
        "harness_api_batches", "gauge", "Batches by status.",
        ((({"status": s}), float(n)) for s, n in sorted(statuses.items())),
    )  # fmt: skip
    lines += _family("harness_api_files", "gauge", "Files stored.", [({}, float(files))])
    lines += _family(
        "harness_api_batch_requests_total", "counter",
        "Finished requests of a batch by outcome (completed or failed).",
        (
            ({"batch": v.row.id, "outcome": outcome}, float(n))
            for v in views
            for outcome, n in (("completed", v.completed), ("failed", v.failed))
        ),
    )  # fmt: skip
    lines += _family(
        "harness_api_batch_requests", "gauge", "Requests in a batch's input file.",
        (({"batch": v.row.id}, float(v.row.total)) for v in views),
    )  # fmt: skip
    for name, help_, attr in (
        ("prompt_tokens", "Prompt tokens of a batch's completed requests.", "prompt_tokens"),
        ("completion_tokens", "Tokens generated.", "completion_tokens"),
    ):
        lines += _family(
            f"harness_api_batch_{name}_total", "counter", help_,
            (({"batch": v.row.id}, float(getattr(v.row, attr))) for v in views),
        )  # fmt: skip
    lines += _family(
        "harness_api_batch_cached_tokens_total", "counter",
        "Prompt tokens served from the prefix cache, over the completed requests whose server "
        "reported them (absent when none did).",
        (({"batch": v.row.id}, float(v.row.cached_tokens)) for v in views if v.row.cached_known),
    )  # fmt: skip
    lines += _family(
        "harness_api_batch_cached_coverage", "gauge",
        "Share of a batch's completed requests whose server reported cached tokens, by the "
        "source of the figure.",
        (
            ({"batch": v.row.id, "source": v.cached_source}, v.cached_coverage)
            for v in views
            if v.cached_coverage is not None
        ),
    )  # fmt: skip
    running = [v for v in views if v.running]
    lines += _family(
        "harness_api_batch_rate_rps", "gauge",
        "Requests per second of the running batch (recent window).",
        (({"batch": v.row.id}, v.rate_rps) for v in running if v.rate_rps is not None),
    )  # fmt: skip
    lines += _family(
        "harness_api_batch_eta_seconds", "gauge", "Estimated seconds left of the running batch.",
        (({"batch": v.row.id}, v.eta_s) for v in running if v.eta_s is not None),
    )  # fmt: skip
    for name, help_, value in (
        ("passthrough_requests_total", "Requests passed through to the model server.",
         counters.passthrough_requests),
        ("passthrough_errors_total", "Pass-through requests that failed.",
         counters.passthrough_errors),
        ("passthrough_refused_total",
         "Pass-through requests refused: the upstream's credentials need this service's key.",
         counters.passthrough_refused),
        ("uploads_total", "Files uploaded.", counters.uploads),
        ("uploads_refused_total", "Uploads refused (size or line limit, quota, full disk).",
         counters.uploads_refused),
        ("bodies_refused_total", "Request bodies refused (--max-request-bytes).",
         counters.bodies_refused),
        ("unauthorized_total", "Requests refused for a missing or wrong API key.",
         counters.unauthorized),
        ("callers_refused_total", "Requests refused for a foreign Host or Origin header.",
         counters.callers_refused),
    ):  # fmt: skip
        lines += _family(f"harness_api_{name}", "counter", help_, [({}, float(value))])
    return "\n".join(lines) + "\n"
