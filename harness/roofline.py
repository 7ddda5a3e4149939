"""Calibrated prefill and decode rates, and the roofline bound of a workload.

Like llama-bench's `pp` and `tg` (with its `-d` depth): the prefill rate is measured on
uncached chunks of the workload's own size appended after the cached shared rubric, the decode
rate on replies generated at that depth, from the server's own timings (separate calibration
requests, not the measured run). From them, a lower bound on the time of any workload:

    bound = uncached prompt tokens ÷ prefill rate + output tokens ÷ decode rate

and `efficiency = bound ÷ measured time`: the share of the wall time the model's compute
explains. What is left is overhead — HTTP, the server's tokenizer and template, scheduling, the
engine itself.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from harness.backends.base import Backend, ChatRequest, ChatResult
from harness.errors import ProtocolError

__all__ = ["Calibration", "bound_seconds", "calibrate"]


@dataclass(frozen=True, slots=True)
class Calibration:
    """Measured compute rates of one server and model."""

    prefill_tps: float
    """Uncached prompt tokens per second, at `depth` cached tokens (median of samples)."""
    decode_tps: float
    """Generated tokens per second of one stream, at `depth` (median of samples)."""
    depth_tokens: int
    chunk_tokens: int
    samples: int
    prefill_samples: tuple[float, ...]
    decode_samples: tuple[float, ...]
    source: str
    """Where the rates come from (`llama.cpp timings`, `ollama durations`)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bound_seconds(cal: Calibration, uncached_tokens: int, output_tokens: int) -> float:
    """Lower bound on the time to process a workload on one stream, in seconds."""
    return uncached_tokens / cal.prefill_tps + output_tokens / cal.decode_tps


def _rates(result: ChatResult) -> tuple[int, float | None, int, float | None]:
    t = result.timings
    raw = result.raw.get("timings") or {}
    prompt_n = int(raw.get("prompt_n", result.usage.uncached_tokens))
    predicted_n = int(raw.get("predicted_n", result.usage.completion_tokens))
    return prompt_n, t.prompt_ms, predicted_n, t.decode_ms


async def calibrate(
    backend: Backend,
    samples: Sequence[Sequence[Mapping[str, str]]],
    *,
    decode_tokens: int = 8,
) -> Calibration:
    """Measure prefill and decode rates on requests of the workload's own shape.

    Each sample is a conversation like the workload's (the shared rubric, then one candidate).
    The shared prefix is warmed first; then each sample is sent with one output token (its
    uncached chunk's prefill is timed), and sent again with `decode_tokens` forced output tokens
    (its prompt is now cached, so the decode is timed alone). At these chunk sizes prefill time
    is not linear in tokens (reading the weights once per batch dominates), so the chunks must
    be the workload's, as llama-bench's `pp` size is chosen to match a workload.
    """
    if not samples:
        raise ValueError("calibration needs at least one sample conversation")
    first = list(samples[0])
    await backend.chat(ChatRequest([*first[:-1], {"role": "user", "content": "ok"}], max_tokens=1))
    prefill: list[float] = []
    decode: list[float] = []
    depth = chunk = 0
    for messages in samples:
        msgs = list(messages)
        pre = await backend.chat(ChatRequest(msgs, max_tokens=1, temperature=0.0))
        n, ms, _, _ = _rates(pre)
        if ms:
            prefill.append(n / ms * 1000.0)
        depth = pre.usage.cached_tokens or 0
        chunk = n
        gen = await backend.chat(
            ChatRequest(
                msgs,
                max_tokens=decode_tokens,
                temperature=0.0,
                extra={"ignore_eos": True},
            )
        )
        _, _, k, dms = _rates(gen)
        if dms and k > 1:
            decode.append(k / dms * 1000.0)
    if not prefill or not decode:
        raise ProtocolError(
            f"{backend.info.base_url} reported no prompt/decode timings; cannot calibrate"
        )
    return Calibration(
        prefill_tps=statistics.median(prefill),
        decode_tps=statistics.median(decode),
        depth_tokens=depth,
        chunk_tokens=chunk,
        samples=len(samples),
        prefill_samples=tuple(prefill),
        decode_samples=tuple(decode),
        source="llama.cpp timings" if backend.info.supports_slots else "server durations",
    )
