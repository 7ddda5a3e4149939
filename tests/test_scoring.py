"""`--score-mode logprobs`: the values' token tree, the distribution read from top
log-probabilities, the runner's probes and fall-backs, and the request bodies each backend sends.

Logic tests: the tree and the maths on hand-made tokenizers and probabilities, the engine on the
in-process double (one token per character, so `10` is two tokens as on Gemma), the OpenAI
backend's bodies on `httpx.MockTransport`. Real servers: `tests/test_embedded.py`-style checks
in `test_logprobs_on_the_embedded_server` (token, text and chat paths) and the Ollama replay in
`tests/test_ollama_replay.py`.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import httpx
import pytest

from harness.backends.base import ChatRequest
from harness.backends.completion import chat_completion
from harness.backends.openai import OpenAIBackend
from harness.engine import JobSpec, RunnerConfig, TrimPolicy, run_job
from harness.engine.tokens import TokenSeq
from harness.models.templates import get_format
from harness.scoring import (
    TokenChoice,
    Unreadable,
    ValueShape,
    ValueTree,
    build_tree,
    read_distribution,
    value_shape,
)
from harness.testing.doubles import InProcessDouble, char_tokenize
from harness.workload import WorkItem

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}},
    "required": ["score"],
    "additionalProperties": False,
}


async def chars(texts: list[str]) -> Sequence[Sequence[int]]:
    return [[ord(c) for c in t] for t in texts]


def tree_of(schema: dict[str, Any] = SCHEMA) -> ValueTree:
    shape = value_shape(schema)
    assert isinstance(shape, ValueShape)
    tree = asyncio.run(build_tree(shape, chars))
    assert isinstance(tree, ValueTree)
    return tree


def top(*pairs: tuple[str, float]) -> list[TokenChoice]:
    """Top tokens by text with probabilities (as logprobs), ids of a char tokenizer."""
    return [
        TokenChoice(t, math.log(p), ord(t) if len(t) == 1 else 10_000 + len(t)) for t, p in pairs
    ]


# -- the shape and the tree -------------------------------------------------------------------


def test_value_shape_reads_integer_ranges_enums_and_booleans() -> None:
    shape = value_shape(SCHEMA)
    assert isinstance(shape, ValueShape)
    assert shape.prefill == '{"score": ' and shape.close == "}"
    assert [t for t, _ in shape.values] == [str(v) for v in range(1, 11)]
    enum = value_shape(
        {"type": "object", "properties": {"fit": {"type": "string", "enum": ["yes", "no"]}}}
    )
    assert isinstance(enum, ValueShape) and [t for t, _ in enum.values] == ['"yes"', '"no"']
    assert not enum.numeric


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        (None, "not a JSON object schema"),
        ({"type": "object", "properties": {"why": {"type": "string"}}}, "neither an integer"),
        (
            {
                "type": "object",
                "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10},
                               "why": {"type": "string"}},
                "required": ["score", "why"],
            },
            "requires why besides 'score'",
        ),
        (
            {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                    "maximum": 1000}}},
            "more than 101 values",
        ),
    ],
)  # fmt: skip
def test_schemas_logprobs_cannot_read_say_why(schema: Any, why: str) -> None:
    reason = value_shape(schema)
    assert isinstance(reason, str) and why in reason


def test_the_tree_asks_where_the_values_part_root_and_after_1() -> None:
    tree = tree_of()
    assert tree.prefill_ids == tuple(ord(c) for c in '{"score": ')
    assert [n.text for n in tree.probes] == ["", "1"]
    assert sorted(tree.root.children) == [ord(str(d)) for d in range(1, 10)]
    after_1 = tree.probes[1]
    assert sorted(after_1.children) == [ord("0"), ord("}")]


def test_a_tokenizer_joining_the_value_to_the_prefill_is_refused() -> None:
    async def joins(texts: list[str]) -> Sequence[Sequence[int]]:
        # `": 7` is one token: neither `{"score": ` nor `{"score":` ends where a value starts.
        out = []
        for t in texts:
            ids = [ord(c) for c in t]
            if len(t) > 10 and t[7:10] == '": ' and t[10].isdigit():
                ids[7:11] = [1000 + ord(t[10])]
            out.append(ids)
        return out

    shape = value_shape(SCHEMA)
    assert isinstance(shape, ValueShape)
    reason = asyncio.run(build_tree(shape, joins))
    assert isinstance(reason, str) and "joins the value" in reason


def test_a_space_joined_to_the_digit_is_left_to_the_model() -> None:
    async def joins(texts: list[str]) -> Sequence[Sequence[int]]:
        out = []
        for t in texts:
            ids = [ord(c) for c in t]
            if len(t) > 10 and t[9] == " " and t[10].isdigit():
                ids[9:11] = [1000 + ord(t[10])]
            out.append(ids)
        return out

    shape = value_shape(SCHEMA)
    assert isinstance(shape, ValueShape)
    tree = asyncio.run(build_tree(shape, joins))
    assert isinstance(tree, ValueTree)
    assert tree.shape.prefill == '{"score":' and tree.shape.sep == " "
    assert [n.text for n in tree.probes] == ["", " 1"]


# -- the distribution -------------------------------------------------------------------------


def test_ten_is_read_exactly_from_the_second_token() -> None:
    tree = tree_of()
    first = top(("1", 0.5), ("7", 0.25), ("x", 0.15), ("2", 0.1))
    after_1 = top(("0", 0.3), ("}", 0.1), (",", 0.6))
    r = read_distribution(tree, [first, after_1])
    # 1..9 renormalised over the allowed first tokens (x is outside), then 1 splits 3:1.
    assert r.distribution["10"] == pytest.approx(0.5 / 0.85 * 0.75)
    assert r.distribution["1"] == pytest.approx(0.5 / 0.85 * 0.25)
    assert r.distribution["7"] == pytest.approx(0.25 / 0.85)
    assert sum(r.distribution.values()) == pytest.approx(1.0)
    # Greedy under the grammar: 1 (the most probable first digit), then 0 over }.
    assert r.score == 10 and r.p == pytest.approx(0.5 / 0.85 * 0.75)
    assert r.argmax == 10
    expected = sum(int(v) * p for v, p in r.distribution.items())
    assert r.expected == pytest.approx(expected)
    # Left free, the model leaves the values with x first, then with "," after 1.
    assert r.p_outside == pytest.approx(1 - (0.25 + 0.1 + 0.5 * 0.4))


def test_greedy_and_most_probable_can_differ_and_both_are_kept() -> None:
    tree = tree_of()
    first = top(("1", 0.4), ("7", 0.35), ("5", 0.25))
    after_1 = top(("0", 0.5), ("}", 0.5))
    r = read_distribution(tree, [first, after_1])
    assert r.score in (1, 10)  # greedy goes through 1
    assert r.argmax == 7  # 0.35 beats 0.2 each for 1 and 10


def test_no_allowed_token_in_the_list_is_unreadable() -> None:
    tree = tree_of()
    with pytest.raises(Unreadable, match="no allowed token"):
        read_distribution(tree, [top(("x", 0.9), ("y", 0.1)), top(("0", 1.0))])


def test_tokens_missing_from_a_full_top_list_bound_the_unseen_mass() -> None:
    tree = tree_of()
    twenty = [(str(d), 0.04) for d in range(1, 6)] + [(f"t{k:02}", 0.04) for k in range(15)]
    r = read_distribution(tree, [top(*twenty), top(("0", 0.5), ("}", 0.5))])
    # 6..9 are not among the twenty listed: each could hold up to the smallest listed, 0.04.
    assert r.unseen_bound == pytest.approx(4 * 0.04)
    assert r.distribution["6"] == 0.0


def test_text_only_top_lists_match_by_text() -> None:
    tree = tree_of()
    first = [TokenChoice("7", math.log(0.9)), TokenChoice("8", math.log(0.1))]
    r = read_distribution(tree, [first, []])
    assert r.score == 7 and r.p == pytest.approx(0.9)


# -- the engine on the double -----------------------------------------------------------------


def items(n: int) -> list[WorkItem]:
    system = {"role": "system", "content": "Score the candidate from 1 to 10."}
    return [
        WorkItem(
            f"c{i}",
            (system, {"role": "user", "content": f"candidate {i}"}),
            max_tokens=16,
            temperature=0.0,
            seed=1,
            output_schema=SCHEMA,
        )
        for i in range(n)
    ]


def run(double: InProcessDouble, work: list[WorkItem], mode: str) -> list[Any]:
    spec = JobSpec(
        policy=TrimPolicy(100_000),
        runner=RunnerConfig(score_mode=mode),
        keep_records=True,
        progress=False,
    )

    async def go() -> list[Any]:
        async with double:
            return (await run_job(double, work, spec)).records

    return asyncio.run(go())


def test_logprobs_mode_gives_the_decoded_scores_with_their_probabilities() -> None:
    work = items(30)
    plain = run(InProcessDouble(tokenizer=char_tokenize), work, "decode")
    decoded = {r.custom_id: r.parsed["score"] for r in plain}
    double = InProcessDouble(tokenizer=char_tokenize)
    records = run(double, work, "logprobs")
    assert {r.custom_id: r.parsed["score"] for r in records} == decoded
    assert any(v == 10 for v in decoded.values())  # the two-token value is among them
    for rec in records:
        assert rec.ok and rec.scoring["mode"] == "logprobs"
        assert rec.scoring["score"] == rec.parsed["score"]
        assert 0 < rec.scoring["p"] <= 1
        assert rec.content == f'{{"score": {rec.parsed["score"]}}}'
        assert rec.probe_tokens == 1  # the probe after "1" computed one more token
    line = records[0].to_batch_line(0)
    assert line["harness"]["scoring"]["distribution"]


def test_each_row_sends_its_prompt_with_the_prefill_and_the_probe_after_1() -> None:
    sent: list[ChatRequest] = []

    class Recording(InProcessDouble):
        async def chat_many(self, requests: Any) -> Any:
            sent.extend(requests)
            return await super().chat_many(requests)

    run(Recording(tokenizer=char_tokenize), items(1), "logprobs")
    assert [r.prefill for r in sent] == ['{"score": ', '{"score": 1']
    assert all(r.max_tokens == 1 and r.top_logprobs == 20 for r in sent)
    assert all(r.grammar is None and r.output_schema is None for r in sent)
    ids = [list(r.prompt_ids or []) for r in sent]
    assert ids[1][: len(ids[0])] == ids[0] and ids[1][-1] == ord("1")
    assert ids[0][-10:] == [ord(c) for c in '{"score": ']


def test_an_unreadable_row_is_decoded_and_says_why() -> None:
    def nothing_allowed(request: ChatRequest, intended: str) -> list[TokenChoice]:
        return [TokenChoice("x", 0.0, ord("x"))]

    records = run(
        InProcessDouble(tokenizer=char_tokenize, logprobs=nothing_allowed), items(3), "logprobs"
    )
    for rec in records:
        assert rec.ok and rec.parsed["score"] in range(1, 11)
        assert rec.scoring["mode"] == "decode"
        assert "no allowed token" in rec.scoring["fallback"]


def test_a_server_without_logprobs_decodes_every_row() -> None:
    records = run(InProcessDouble(tokenizer=char_tokenize, logprobs=None), items(3), "logprobs")
    assert all(r.ok and r.scoring is None and r.probe_tokens == 0 for r in records)


# -- the OpenAI backend's bodies --------------------------------------------------------------


def started_backend(handler: Any, path: str) -> OpenAIBackend:
    def route(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        if request.url.path == "/props":
            return httpx.Response(
                200,
                json={"total_slots": 1, "default_generation_settings": {"n_ctx": 8192}},
            )
        return handler(request)

    backend = OpenAIBackend(
        "http://llama",
        api_key_env=None,
        transport=httpx.MockTransport(route),
        chat_format=get_format("gemma"),
        request_path=path,
    )
    asyncio.run(backend.start())
    return backend


def completion(content: str, tops: list[tuple[str, int, float]], index: int = 0) -> dict[str, Any]:
    entries = [{"id": i, "token": t, "logprob": lp} for t, i, lp in tops]
    return {
        "index": index,
        "content": content,
        "tokens_predicted": 1,
        "stop_type": "limit",
        "timings": {"cache_n": 10, "prompt_n": 5, "prompt_ms": 3.0, "predicted_ms": 0.0},
        "completion_probabilities": [{**entries[0], "top_logprobs": entries}],
    }


def test_the_token_path_sends_other_probes_in_one_completion_call() -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        # llama-server may answer the prompts out of order; each result has its index.
        return httpx.Response(
            200,
            json=[completion("0", [("0", 48, -0.1)], 1), completion("7", [("7", 55, -0.2)], 0)],
        )

    backend = started_backend(handler, "tokens")
    # Two probe prompts that differ by more than one token (an enum's, say).
    reqs = [
        ChatRequest([], max_tokens=1, top_logprobs=20, prefill='{"fit": "', prompt_ids=[2, 5]),
        ChatRequest([], max_tokens=1, top_logprobs=20, prefill='{"fit": "ye',
                    prompt_ids=[2, 5, 49, 50]),
    ]  # fmt: skip
    results = asyncio.run(backend.chat_many(reqs))
    assert len(bodies) == 1
    assert bodies[0]["prompt"] == [[2, 5], [2, 5, 49, 50]]
    assert bodies[0]["n_probs"] == 20 and bodies[0]["n_predict"] == 1
    assert [r.content for r in results] == ["7", "0"]
    assert results[0].top_logprobs == [[TokenChoice("7", -0.2, 55)]]
    # The results line keeps the probabilities as OpenAI's logprobs.content (the one mapping
    # of a reply to a chat.completion body), the server's own body beside it.
    body = chat_completion(results[0])
    assert body["choices"][0]["logprobs"]["content"][0]["token"] == "7"
    assert results[0].raw["completion_probabilities"][0]["token"] == "7"


def test_the_text_path_appends_the_prefill_and_the_chat_path_continues_a_message() -> None:
    seen: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.path, body))
        if request.url.path == "/completion":
            return httpx.Response(200, json=completion("7", [("7", 55, -0.2)]))
        reply = {
            "choices": [
                {
                    "message": {"role": "assistant", "content": '{"score": 7'},
                    "finish_reason": "length",
                    "logprobs": {"content": [{"token": "7", "logprob": -0.2, "id": 55,
                                              "top_logprobs": [{"token": "7", "logprob": -0.2,
                                                                "id": 55}]}]},
                }
            ],
            "usage": {"prompt_tokens": 20, "completion_tokens": 1},
        }  # fmt: skip
        return httpx.Response(200, json=reply)

    msgs = [{"role": "user", "content": "hi"}]
    req = ChatRequest(msgs, max_tokens=1, top_logprobs=20, prefill='{"score": ')
    text = started_backend(handler, "text")
    asyncio.run(text.chat(req))
    assert seen[-1][1]["prompt"].endswith('<start_of_turn>model\n{"score": ')
    chat = started_backend(handler, "chat")
    result = asyncio.run(chat.chat(req))
    body = seen[-1][1]
    assert body["messages"][-1] == {"role": "assistant", "content": '{"score": '}
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert result.top_logprobs == [[TokenChoice("7", -0.2, 55)]]


def test_probe_ids_extend_the_counted_prompt() -> None:
    from array import array

    from harness.engine.logprobs import probe_requests

    tree = tree_of()
    base = ChatRequest([], max_tokens=16, output_schema=SCHEMA, grammar="root ::= x")
    prompt = TokenSeq([array("i", [2, 3])])
    out = probe_requests(base, tree, prompt)
    assert [list(r.prompt_ids or []) for r in out] == [
        [2, 3, *(ord(c) for c in '{"score": ')],
        [2, 3, *(ord(c) for c in '{"score": 1')],
    ]


def test_a_bpe_space_joined_to_the_value_is_left_to_the_model() -> None:
    """SmolLM2's tokenizer writes `{"fit": "yes"}` with ` "` as one token: the prefill then
    stops before the space, and the values' paths start with it."""

    async def bpe(texts: list[str]) -> Sequence[Sequence[int]]:
        out = []
        for t in texts:
            ids, k = [], 0
            while k < len(t):
                if t[k : k + 2] == ' "':
                    ids.append(1000)
                    k += 2
                else:
                    ids.append(ord(t[k]))
                    k += 1
            out.append(ids)
        return out

    shape = value_shape(
        {"type": "object", "properties": {"fit": {"type": "string", "enum": ["yes", "no"]}}}
    )
    assert isinstance(shape, ValueShape)
    tree = asyncio.run(build_tree(shape, bpe))
    assert isinstance(tree, ValueTree)
    assert tree.shape.prefill == '{"fit":' and tree.shape.sep == " "
    # ` "` is the one way on from the prefill; the values part after it.
    assert [n.text for n in tree.probes] == [' "']
    r = read_distribution(tree, [top(("y", 0.7), ("n", 0.2), ("m", 0.1))])
    assert r.score == "yes" and r.distribution == pytest.approx(
        {'"yes"': 0.7 / 0.9, '"no"': 0.2 / 0.9}
    )


# -- which mode a measurement was in ----------------------------------------------------------


def test_reports_say_which_score_mode_their_throughput_was_measured_in() -> None:
    from harness.scoring import mode_of_report, planned_mode

    free_text = planned_mode("logprobs", None)
    assert free_text == {
        "asked": "logprobs",
        "used": "decode",
        "why": "the output schema is not a JSON object schema",
    }
    assert planned_mode("logprobs", SCHEMA)["used"] == "logprobs"
    assert mode_of_report({"score_mode": planned_mode("decode", SCHEMA)}).startswith(
        "score mode decode"
    )
    assert mode_of_report({"config": {"score_mode": {"value": "logprobs"}}}) == (
        "score mode logprobs"
    )
    assert "before score modes existed" in mode_of_report({})


# -- on the real server -----------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("path", ["tokens", "text", "chat"])
def test_logprobs_on_the_embedded_server(gemma_server: Any, path: str) -> None:
    """Gemma 3 270M on llama-server: every row read from the probabilities (Gemma writes 10 as
    `1`, `0`: two prompts a row), the distribution over 1..10 complete, the server's prompt
    the counted one plus the prefill, the probabilities kept in the results body."""
    from harness.engine.job import open_token_counter

    system = {"role": "system", "content": "Score the candidate from 1 to 10. Reply with JSON."}
    work = [
        WorkItem(
            f"c{i}",
            (system, {"role": "user", "content": f"Candidate {i}: {i + 2} years of Spark."}),
            max_tokens=16,
            temperature=0.0,
            seed=1,
            output_schema=SCHEMA,
        )
        for i in range(4)
    ]
    backend = OpenAIBackend(gemma_server.url, api_key_env=None, request_path=path,
                            chat_format=get_format("gemma"))  # fmt: skip

    async def go() -> list[Any]:
        async with backend, open_token_counter(backend) as counter:
            spec = JobSpec(
                policy=TrimPolicy(8192),
                runner=RunnerConfig(score_mode="logprobs"),
                keep_records=True,
                progress=False,
            )
            return (await run_job(backend, work, spec, counter=counter)).records

    records = asyncio.run(go())
    assert backend.info.supports_prefill
    for rec in records:
        assert rec.ok, rec.error
        s = rec.scoring
        assert s is not None and s["mode"] == "logprobs", s
        assert sum(s["distribution"].values()) == pytest.approx(1.0)
        assert [step["after"] for step in s["steps"]] == ["", "1"]
        assert 0.0 <= s["p_outside"] <= 1.0 and rec.parsed["score"] == s["score"]
        assert rec.prompt_tokens == rec.expected_prompt_tokens  # counted here, with the prefill
        # The probe after `1` costs at least that token (llama-server re-evaluated the last 5
        # of a 43-token prompt as well: its cache for Gemma's sliding-window layers).
        assert rec.probe_tokens >= 1
        assert rec.completion is not None
        assert rec.completion["choices"][0]["logprobs"]["content"][0]["top_logprobs"]


def test_the_chat_path_asks_both_positions_in_one_request_forcing_the_one_token() -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        entries = [
            {"token": "1", "logprob": -0.5, "id": 49,
             "top_logprobs": [{"token": "1", "logprob": -0.5, "id": 49},
                              {"token": "7", "logprob": -1.5, "id": 55}]},
            {"token": "0", "logprob": -0.1, "id": 48,
             "top_logprobs": [{"token": "0", "logprob": -0.1, "id": 48},
                              {"token": "}", "logprob": -2.5, "id": 125}]},
        ]  # fmt: skip
        reply = {
            "choices": [
                {
                    "message": {"role": "assistant", "content": '{"score": 10'},
                    "finish_reason": "length",
                    "logprobs": {"content": entries},
                }
            ],
            "usage": {"prompt_tokens": 20, "completion_tokens": 2},
            "timings": {"cache_n": 15, "prompt_n": 5, "prompt_ms": 4.0, "predicted_ms": 9.0},
        }
        return httpx.Response(200, json=reply)

    backend = started_backend(handler, "chat")
    msgs = [{"role": "user", "content": "hi"}]
    reqs = [
        ChatRequest(msgs, max_tokens=1, top_logprobs=20, prefill='{"score": ', prompt_ids=[2, 5]),
        ChatRequest(msgs, max_tokens=1, top_logprobs=20, prefill='{"score": 1',
                    prompt_ids=[2, 5, 49]),
    ]  # fmt: skip
    a, b = asyncio.run(backend.chat_many(reqs))
    assert len(bodies) == 1
    assert bodies[0]["logit_bias"] == {"49": 100} and bodies[0]["max_tokens"] == 2
    assert bodies[0]["messages"][-1] == {"role": "assistant", "content": '{"score": '}
    assert [c.token for c in (a.top_logprobs or [[]])[0]] == ["1", "7"]
    assert [c.token for c in (b.top_logprobs or [[]])[0]] == ["0", "}"]
    assert b.usage.uncached_tokens == 1  # the forced token: one more step
    # Prompts that differ otherwise are asked one by one.
    other = [reqs[0], replace(reqs[1], prompt_ids=[2, 6, 49])]
    asyncio.run(backend.chat_many(other))
    assert len(bodies) == 3 and "logit_bias" not in bodies[1]


def test_the_token_path_forces_the_one_token_probe_in_a_single_task() -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        data = completion("10", [("1", 49, -0.5), ("7", 55, -1.5)])
        data["completion_probabilities"].append(
            {"id": 48, "token": "0", "logprob": -0.1,
             "top_logprobs": [{"id": 48, "token": "0", "logprob": -0.1},
                              {"id": 125, "token": "}", "logprob": -2.5}]}
        )  # fmt: skip
        data["tokens_predicted"] = 2
        return httpx.Response(200, json=data)

    backend = started_backend(handler, "tokens")
    reqs = [
        ChatRequest([], max_tokens=1, top_logprobs=20, prefill='{"score": ', prompt_ids=[2, 5]),
        ChatRequest([], max_tokens=1, top_logprobs=20, prefill='{"score": 1',
                    prompt_ids=[2, 5, 49]),
    ]  # fmt: skip
    a, b = asyncio.run(backend.chat_many(reqs))
    assert len(bodies) == 1
    assert bodies[0]["prompt"] == [2, 5] and bodies[0]["n_predict"] == 2
    assert bodies[0]["logit_bias"] == [[49, 100]]
    assert [c.token for c in (a.top_logprobs or [[]])[0]] == ["1", "7"]
    assert [c.token for c in (b.top_logprobs or [[]])[0]] == ["0", "}"]
