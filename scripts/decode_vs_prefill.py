"""Why `--score-mode logprobs` and decoding part on some rows: the same tokens, computed as
decode steps or as one prefill batch, give other probabilities on llama.cpp's CPU build.

    python scripts/decode_vs_prefill.py                    # 200 generated rows, Ollama's flags
    python scripts/decode_vs_prefill.py --rows 50 --cold 10 --swa-full

One embedded server (gemma3-270m, Ollama's flags unless --swa-full) with three slots, one per
kind of request below, so each slot's cache goes from row to row as a `harness run` of that
kind would (and no request finds another kind's tokens in its cache); the default prompt, the
rows of `harness generate` (seed 0), in order. Per row, on the prompt as the text path renders
it:

- decode: the reply under the schema's grammar, greedy, with the top log-probabilities of every
  token written; the fixed JSON the model writes before the value (its own tokens) and the
  value's first token;
- prefill: the same prompt followed by those very tokens (the model's own, not the prefill's
  tokenization of `{"score": `), one generated token's top log-probabilities: the value's first
  token is the most probable of the values' first tokens (`1`..`9` for 1..10 on Gemma);
- cold (the first `--cold` rows): the decode again from an empty cache (`cache_prompt: false`).

It prints how often the value's first token is the same, decode against prefill and decode warm
against cold, and, for each row that differs, the top two values' first tokens with their
log-probabilities in each. The value's first token decides the score except between 1 and 10
(the same first token), which this leaves out.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.backends.embedded import EmbeddedServer
from harness.backends.server import ollama_settings
from harness.models.templates import get_format
from harness.scoring import value_shape
from harness.workload import generate_candidates, load_prompt, tight_grammar


def firsts(entry: dict[str, Any], allowed: set[str]) -> list[tuple[str, float]]:
    """The allowed first tokens among a position's top log-probabilities, most probable first."""
    tops = [(t["token"], t["logprob"]) for t in entry["top_logprobs"] if t["token"] in allowed]
    return sorted(tops, key=lambda t: -t[1])


def show(tops: list[tuple[str, float]]) -> str:
    return ", ".join(f"{tok} {lp:.3f}" for tok, lp in tops[:2])


def main() -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--cold", type=int, default=10, help="rows also decoded from an empty cache")
    p.add_argument("--swa-full", action="store_true", help="full-size sliding-window KV cache")
    a = p.parse_args()
    spec = load_prompt()
    shape = value_shape(spec.output_schema)
    assert not isinstance(shape, str), shape
    allowed = {text[0] for text, _ in shape.values}
    grammar = tight_grammar(spec.output_schema)
    fmt = get_format("gemma")
    settings = ollama_settings("gemma3-270m", 8192, num_parallel=3)
    if a.swa_full:
        from dataclasses import replace

        settings = replace(settings, swa_full=True)
    same_prefill = same_cold = cold_n = 0
    wrappers: collections.Counter[tuple[str, ...]] = collections.Counter()
    with EmbeddedServer(settings) as srv:
        assert srv.url is not None
        client = httpx.Client(base_url=srv.url, timeout=600)

        def post(**body: Any) -> dict[str, Any]:
            reply = client.post("/completion", json={"temperature": 0, **body})
            reply.raise_for_status()
            data: dict[str, Any] = reply.json()
            return data

        for i, row in enumerate(generate_candidates(a.rows, seed=0)):
            messages = [
                {"role": "system", "content": spec.system},
                {"role": "user", "content": spec.render(row, "id")},
            ]
            text = fmt.render_text(messages)
            dec = post(prompt=text, grammar=grammar, n_predict=12, n_probs=20, id_slot=0)
            probs = dec["completion_probabilities"]
            k = next(j for j, e in enumerate(probs) if e["token"] in allowed)
            wrap = [e["id"] for e in probs[:k]]
            wrappers[tuple(e["token"] for e in probs[:k])] += 1
            decoded = firsts(probs[k], allowed)
            pre = post(prompt=[text, *wrap], n_predict=1, n_probs=20, id_slot=1)
            prefilled = firsts(pre["completion_probabilities"][0], allowed)
            if decoded[0][0] == prefilled[0][0]:
                same_prefill += 1
            else:
                print(f"{row['id']}: decoded {show(decoded)} | prefilled {show(prefilled)}")
            if i < a.cold:
                cold = post(prompt=text, grammar=grammar, n_predict=12, n_probs=20,
                            cache_prompt=False, id_slot=2)  # fmt: skip
                c = firsts(cold["completion_probabilities"][k], allowed)
                cold_n += 1
                if c[0][0] == decoded[0][0]:
                    same_cold += 1
                else:
                    print(f"{row['id']}: decoded warm {show(decoded)} | cold {show(c)}")
    print(f"fixed JSON as the model writes it: {json.dumps([list(w) for w in wrappers])} "
          f"({', '.join(str(n) for n in wrappers.values())} rows)")  # fmt: skip
    flags = "--swa-full" if a.swa_full else "Ollama's flags"
    print(
        f"value's first token, decode = prefill of the same tokens: {same_prefill} of {a.rows}; "
        f"decode warm = cold: {same_cold} of {cold_n} ({flags})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
