"""Phase 1's logic: the memory sweep and search (harness.limits) turned into the report's
figures, the configuration to write back, and the KV cost of the other cache layout.

The sweep runs with the server flags the later phases and `harness run` use (Ollama's by
default), so the KV bytes per token written to harness.yaml are those of the server that runs
the batch. With Ollama's flags Gemma's sliding-window layers are capped at their window and only
the global layers grow with the context; `swa_full` keeps full-size windows (what conversation
batching needs to reuse the rubric after a trim) and costs several times more per token: the
report measures both, so the choice is made on figures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from harness.engine.strategies import SAFE_FRACTION
from harness.limits import (
    EmbeddedContextProbe,
    LimitSearch,
    Measurement,
    MemoryFit,
    fit_memory,
)
from harness.models import ModelGeometry
from harness.models.kv import KVTheory, UnknownGeometry, kv_theory

__all__ = [
    "geometry_figures",
    "limits_figures",
    "longest_prompt_figures",
    "other_layout_kv",
    "recommended_config",
    "theory_or_none",
]


def theory_or_none(geom: ModelGeometry, cache_type: str = "f16") -> tuple[KVTheory | None, str]:
    """The KV theory, or None with why (an architecture the theory does not model)."""
    try:
        return kv_theory(geom, cache_type), f"theory from {geom.source}"
    except UnknownGeometry as exc:
        return None, str(exc)


def geometry_figures(geom: ModelGeometry) -> dict[str, Any]:
    return {
        "architecture": geom.architecture,
        "layers": geom.n_layers,
        "kv_heads": geom.n_kv_heads,
        "key_length": geom.key_length,
        "sliding_window": geom.sliding_window,
        "global_layers": list(geom.global_layers),
        "trained_context": geom.context_length,
        "source": geom.source,
    }


def other_layout_kv(
    model: str,
    sizes: list[int],
    *,
    server_flags: str,
    on_measure: Callable[[Measurement], None] | None = None,
) -> dict[str, Any]:
    """KV bytes per token of the layout the run does not use, measured at two sizes: with
    Ollama's flags, the harness's `swa_full` (full-size sliding windows); else Ollama's."""
    if server_flags == "ollama":
        probe = EmbeddedContextProbe(model, server_flags="harness", swa_full=True)
        layout = "swa_full (harness flags)"
    else:
        probe = EmbeddedContextProbe(model, server_flags="ollama")
        layout = "ollama flags (windows capped)"
    points = [probe.measure(n) for n in sizes[:2]]
    for m in points:
        if on_measure is not None:
            on_measure(m)
    try:
        fit = fit_memory(points)
    except Exception as exc:  # a failed load: say so, do not guess
        return {"layout": layout, "kv_bytes_per_token": None, "error": str(exc)}
    return {
        "layout": layout,
        "kv_bytes_per_token": fit.slope,
        "base_model_memory_bytes": fit.intercept,
        "measurements": [m.to_dict() for m in points],
        "source": points[0].source,
    }


def recommended_config(
    *,
    max_ctx: int,
    fit: MemoryFit,
    parallel: int,
    server_flags: str | None,
) -> dict[str, Any]:
    """The values phase 1 writes to harness.yaml (phase 5 of the roadmap). TRIM_INTERVAL is
    the performance phase's (measured at several intervals); phase 1 reports the most
    exchanges that fit under the threshold (`trim_interval_that_fits`) as its bound."""
    out: dict[str, Any] = {
        "MAX_CONTEXT_TOKENS": max_ctx,
        "CONTEXT_TRIM_THRESHOLD": int(max_ctx * SAFE_FRACTION),
        "MODEL_VRAM_GB": round(fit.intercept / 1e9, 3),
        "KV_CACHE_PER_TOKEN_MB": round(fit.slope / 1e6, 6),
        "n_ctx": max_ctx,
        "parallel": parallel,
    }
    if server_flags is not None:
        out["SERVER_FLAGS"] = server_flags
    return out


def longest_prompt_figures(
    shape: Mapping[str, float], safe_tokens: int, rows: int, input_name: str | None
) -> dict[str, Any]:
    """Whether the longest prompt fits the safe context: the rubric, the longest of `rows`
    rows (`shape`: `context_shape` of them) and its reply; `input_name`: the user's input they
    are the longest rows of (None: the rows the phase draws)."""
    tokens = int(shape["prefix_tokens"] + shape["max_tokens_per_exchange"])
    return {
        "longest_prompt_tokens": tokens,
        "longest_prompt_fits": tokens <= safe_tokens,
        "longest_prompt_rows": (
            f"the {rows} longest rows of {input_name} (by characters of the columns the prompt "
            "shows), their tokens counted: the rubric, the longest row and its reply"
            if input_name
            else f"the longest of the {rows} rows the phase draws (not your input)"
        ),
    }


def limits_figures(
    *,
    model: str,
    geom: ModelGeometry,
    theory: KVTheory | None,
    theory_note: str,
    measured: list[Measurement],
    skipped: list[int],
    fit: MemoryFit,
    search: LimitSearch,
    budget: int,
    budget_source: str,
    tokens: Mapping[str, float],
    recommended: Mapping[str, Any],
) -> dict[str, Any]:
    """The figures of `context_limit_results.json`."""
    growing = theory.bytes_per_token_growing if theory is not None else None
    measured_max = max((m.memory_bytes or 0) for m in [*measured, *search.steps])
    return {
        "model": model,
        "model_geometry": geometry_figures(geom),
        "measurements": [
            {
                "n_ctx": m.n_ctx,
                "memory_bytes": m.memory_bytes,
                "source": m.source,
                "ok": m.ok,
                "detail": m.detail,
            }
            for m in measured
        ],
        "sweep_skipped_predicted_over_budget": skipped,
        "search_measurements": [m.to_dict() for m in search.steps],
        "search_steps": len(search.steps),
        "search_skipped_predicted_over_budget": search.skipped,
        "base_model_memory_bytes": fit.intercept,
        "kv_bytes_per_token": fit.slope,
        "kv_bytes_per_token_source": measured[0].source if measured else None,
        "kv_bytes_per_token_theory": growing,
        "kv_bytes_per_token_theory_no_window": (
            theory.bytes_per_token_all_layers if theory is not None else None
        ),
        "kv_theory_note": theory_note,
        "kv_theory_ratio": fit.slope / growing if growing else None,
        "r_squared": fit.r_squared,
        "memory_budget_bytes": budget,
        "memory_budget_source": budget_source,
        "budget_crossing_tokens": search.crossing_estimate,
        "max_context_tokens": search.max_context_tokens,
        "limited_by": search.limited_by,
        "max_measured_bytes": measured_max,
        "within_budget": measured_max <= budget,
        "safe_context_tokens": int(search.max_context_tokens * SAFE_FRACTION),
        "workload_tokens": dict(tokens),
        "recommended": dict(recommended),
    }
