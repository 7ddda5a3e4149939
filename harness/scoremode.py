"""Which score mode a run uses, and the banner line that says which and why.

`RunConfig.score_mode` says what was asked (command line, harness.yaml's SCORE_MODE, or the
default `decode`). A run scores in `logprobs` only when its server can (it continues a started
reply and reports top log-probabilities), the engine has the model's tokenizer, and the output
schema is one whose value the probabilities can be read for (`harness.scoring.value_shape`);
otherwise it decodes, and the line says why. When the mode came from harness.yaml, the line names
the measurement behind it (the performance phase writes SCORE_MODE only where the two modes gave
the same scores): the report, its date and the agreement it measured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from harness.backends.base import Backend
from harness.config import ProfileConfig
from harness.engine.logprobs import LogprobScorer, describe, logprobs_unavailable
from harness.engine.tokens import TokenCounter
from harness.run.settings import RunConfig

__all__ = ["choose_score_mode", "measured_by"]


def measured_by(config: ProfileConfig, root: Path = Path()) -> str:
    """What harness.yaml says of its SCORE_MODE: the report and date, and the agreement the
    report measured (when it can be read)."""
    prov = config.provenance.get("SCORE_MODE")
    if not isinstance(prov, Mapping) or not prov.get("report"):
        return "set by hand"
    text = f"measured in {prov['report']} on {prov.get('date', '?')}"
    with contextlib.suppress(OSError, orjson.JSONDecodeError, AttributeError, TypeError):
        data = orjson.loads((root / str(prov["report"])).read_bytes())
        agree = data.get("figures", data).get("score_agreement")
        rows = data.get("figures", data).get("score_agreement_rows")
        if isinstance(agree, int | float):
            text += f": the two modes gave the same score on {agree:.1%} of {rows} rows"
    return text


async def choose_score_mode(
    cfg: RunConfig,
    backend: Backend,
    counter: TokenCounter,
    schema: Mapping[str, Any] | None,
    config: ProfileConfig | None = None,
) -> tuple[str, str]:
    """(the mode the run uses, the banner line saying which and why)."""
    asked = cfg.score_mode
    source = asked.source
    if source == "harness.yaml" and config is not None:
        source = f"harness.yaml, {measured_by(config)}"
    if asked.value != "logprobs":
        return "decode", f"score mode: decode ({source}): the model writes each reply"
    why = logprobs_unavailable(backend, counter.source)
    tree: Any = why
    if why is None:
        tree = await LogprobScorer(counter).tree_for(schema)
        if isinstance(tree, str):
            why = tree
    if why is not None:
        return "decode", f"score mode: decode (logprobs asked, {source}, but {why})"
    return "logprobs", (
        f"score mode: logprobs ({source}): {describe(tree)}; the scores CSV gets score_expected "
        "and score_p"
    )
