"""The quality phase's near-tie evidence, end to end on a real embedded llama.cpp server.

A score that changed between two decoded runs is told a near-tie or a real change by the top
log-probabilities the decoded replies carry at the token where they part (`harness.phases.
quality.decode_margin`). Those are read from the reply as the runner maps it, on every request
path. Its unit tests build records by hand; this one has SmolLM2-135M-Instruct (the quality
suite's model) decode real replies under the schema's grammar with `top_logprobs`, on the chat,
text and tokens paths, and checks that each reply's evidence is found and every flip between
two of them is classified: once, on the `/completion` paths, none was (`near_tie: None`), and
`pytest suites/quality` failed on `flips_not_near_tie`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace

import pytest

from harness.backends.embedded import EmbeddedServer
from harness.backends.openai import REQUEST_PATHS, OpenAIBackend
from harness.backends.server import ServerSettings
from harness.engine import JobSpec, RunnerConfig, TrimPolicy, run_job
from harness.engine.job import open_token_counter
from harness.models.registry import resolve_model
from harness.phases import quality as q
from harness.records import RequestRecord
from harness.scoring import TOP_N
from harness.workload import WorkItem

pytestmark = pytest.mark.integration

SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}},
    "required": ["score"],
    "additionalProperties": False,
}
ASKED = (2, 9, 5, 7)


@pytest.fixture(scope="module")
def smollm2() -> Iterator[EmbeddedServer]:
    with EmbeddedServer(ServerSettings(model="smollm2-135m", n_ctx=4096)) as server:
        yield server


def work() -> list[WorkItem]:
    system = {
        "role": "system",
        "content": 'You rate candidates. Reply with JSON {"score": N}, N the number asked for.',
    }
    return [
        WorkItem(
            f"c{i}",
            (system, {"role": "user", "content": f"Give this candidate the score {v}."}),
            max_tokens=16,
            temperature=0.0,
            seed=1,
            output_schema=SCHEMA,
        )
        for i, v in enumerate(ASKED)
    ]


def decoded(server: EmbeddedServer, path: str, items: list[WorkItem]) -> list[RequestRecord]:
    """The items decoded as the quality suite decodes them (top log-probabilities kept)."""
    assert server.url is not None
    backend = OpenAIBackend(
        server.url,
        api_key_env=None,
        request_path=path,
        chat_format=resolve_model("smollm2-135m").chat_format,
    )

    async def go() -> list[RequestRecord]:
        async with backend, open_token_counter(backend) as counter:
            spec = JobSpec(
                policy=TrimPolicy(4096),
                runner=RunnerConfig(score_mode="decode", top_logprobs=TOP_N),
                keep_records=True,
                progress=False,
            )
            return (await run_job(backend, items, spec, counter=counter)).records

    return asyncio.run(go())


@pytest.mark.parametrize("path", REQUEST_PATHS)
def test_decoded_flips_on_a_real_server_are_all_classified(
    smollm2: EmbeddedServer, path: str
) -> None:
    items = work()
    run_a = decoded(smollm2, path, items)
    scores = [q.score(r) for r in run_a]
    assert all(r.ok for r in run_a) and None not in scores, [r.error for r in run_a]
    assert len(set(scores)) >= 2, f"the model gave every row one score: {scores}"
    for rec in run_a:
        written = q._written(rec)
        assert written is not None, f"{path}: no top log-probabilities in {rec.completion}"
        tokens, tops = written
        text = "".join(tokens).replace(" ", "").replace("\n", "")
        assert f'"score":{q.score(rec)}' in text, (text, rec.content)  # this reply's tokens
        assert len(tops) == len(tokens) and all(tops)
    # Run b: each row's reply is the next row's, so every row whose score differs is a flip
    # between two real decoded replies, as two runs of the suite would give.
    run_b = [
        replace(run_a[(i + 1) % len(run_a)], custom_id=rec.custom_id) for i, rec in enumerate(run_a)
    ]
    flipped = q.flips(items, run_a, run_b)
    assert flipped, scores
    for flip in flipped:
        assert flip["near_tie"] in (True, False), flip
        assert isinstance(flip["decoded_gap_at_most"], float), flip
        assert 0.0 <= flip["decoded_gap_at_most"] <= 1.0
