"""The one backend contract, its request/response types, and the registry of backends.

Every backend (embedded llama.cpp, any OpenAI-compatible server, Ollama) takes a `ChatRequest`
and returns a `ChatResult` whose usage is normalised:

- `prompt_tokens`: the whole prompt, cached or not;
- `cached_tokens`: tokens served from the prefix cache, or None when the server does not say
  (`cached_source` says where the figure came from: the server's usage, llama.cpp's timings,
  or a test double);
- `completion_tokens`: tokens generated.

Backends register themselves by name (`@Backend.register("openai")`) when the package
`harness.backends` is imported (its `__init__` imports them; this module imports none of them).
Each registered class says how it is built from a run's resolved settings (`from_spec`, given a
`BackendSpec`), which model it runs when none is named (`default_model`) and which scenario
profile a run on it reads (`default_profile`); every list of backends (the command line's
choices, `--harness-backend`, help texts) is `Backend.runnable()`. A run builds its backend in
one place, `harness.run.factory.open_backend`. Failures are raised as `harness.errors` classes,
translated once at the backend's edge (`harness.backends.http`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, TypeVar

from harness.errors import ConfigError
from harness.memory import MemoryProbe
from harness.models.geometry import ModelGeometry
from harness.models.templates import ChatFormat
from harness.scoring import TokenChoice

__all__ = [
    "Backend",
    "BackendSpec",
    "ChatRequest",
    "ChatResult",
    "ServerInfo",
    "Timings",
    "TokenChoice",
    "Usage",
]

Message = Mapping[str, str]
B = TypeVar("B", bound="type[Backend]")


@dataclass(slots=True)  # not frozen: built for every request, and frozen __init__ is slow
class ChatRequest:
    """One chat completion to run."""

    messages: Sequence[Message]
    """The conversation, OpenAI-style `{"role": ..., "content": ...}` dicts."""
    max_tokens: int | None = None
    """Upper bound on generated tokens."""
    temperature: float | None = None
    seed: int | None = None
    output_schema: Mapping[str, Any] | None = None
    """JSON schema the reply must follow (structured output), when the backend supports it."""
    grammar: str | None = None
    """GBNF grammar (llama.cpp only); takes precedence over `output_schema` there."""
    slot: int | None = None
    """llama.cpp server slot to run on (`id_slot`), to keep a conversation's prefix cached."""
    turn: int | None = None
    """The request's place in its conversation (0: it starts one; None: not told). A pool
    (`harness.backends.pool`) moves a slot back to its own server only at a conversation's start."""
    cache_prompt: bool = True
    """Whether the server may reuse its prefix cache (off for the naive baseline)."""
    timeout_s: float | None = None
    """Per-request timeout in seconds (None: the backend's default)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Further body fields passed through as given (e.g. from an OpenAI Batch line)."""
    prompt_ids: Iterable[int] | None = None
    """The prompt's token ids as the engine counted them (BOS first), for backends whose
    request path sends ids instead of messages (llama.cpp's `/completion`)."""
    prefill: str | None = None
    """The start of the assistant's reply, already written: the model continues it (the text
    path appends it to the rendered prompt, the chat path sends it as a final assistant message,
    Ollama as a raw prompt). On the token path `prompt_ids` already end with its tokens."""
    top_logprobs: int | None = None
    """Ask for the log-probabilities of the N most likely tokens at each generated position."""


@dataclass(slots=True)  # not frozen: built for every request, and frozen __init__ is slow
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    """Tokens of the whole prompt, cached or not."""
    completion_tokens: int
    """Tokens generated."""
    cached_tokens: int | None
    """Prompt tokens served from the prefix cache; None when unknown."""
    cached_source: str = "server"
    """How `cached_tokens` was obtained: `server` (usage.prompt_tokens_details, Ollama's
    prompt_eval_cached_count), `llama.cpp timings` (timings.cache_n), `double` (a test
    double's simulation, not a measurement), or `unknown`."""
    prompt_tokens_complete: bool = True
    """False when the server's prompt count does not cover the whole prompt (Ollama 0.30.0
    counted only new tokens): such a count cannot reveal a truncated prompt."""
    cached_omitted: bool = False
    """The reply left the cached count out and `cached_tokens` is 0 by inference: the same
    server sent the field on earlier replies, so it leaves a zero out (counted as 0, never
    dropped from the savings ratio, where it would make savings read high)."""

    @property
    def uncached_tokens(self) -> int:
        """Prompt tokens the server had to compute."""
        return self.prompt_tokens - (self.cached_tokens or 0)


@dataclass(slots=True)  # not frozen: built for every request, and frozen __init__ is slow
class Timings:
    """Where the time of one request went."""

    total_ms: float
    """Wall time seen by the client, in milliseconds."""
    prompt_ms: float | None = None
    """Server time spent on the prompt (prefill), in milliseconds."""
    decode_ms: float | None = None
    """Server time spent generating, in milliseconds."""
    load_ms: float | None = None
    """Server time spent loading the model for this request, in milliseconds."""


@dataclass(slots=True)  # not frozen: built for every request, and frozen __init__ is slow
class ChatResult:
    """The reply to one `ChatRequest`."""

    content: str
    finish_reason: str | None
    usage: Usage
    timings: Timings
    raw: Mapping[str, Any]
    """The server's reply body as received (OpenAI or Ollama shape)."""
    slot: int | None = None
    context_shifted: bool = False
    """The server dropped tokens from the sequence to go on (llama.cpp's context shift: its
    reply says `truncated`). The prompt the model saw was not the prompt that was sent."""
    endpoint: str | None = None
    """Which server of a pool answered (`harness.backends.pool`); None for a single server."""
    top_logprobs: list[list[TokenChoice]] | None = None
    """Per generated token, the most likely tokens at its position (`ChatRequest.top_logprobs`
    asked), as the server reported them; None when not asked or not reported."""


@dataclass(slots=True)
class ServerInfo:
    """What a started backend knows about its server."""

    backend: str
    base_url: str
    model: str
    server: str = "unknown"
    """Server software and version when known, e.g. `llama.cpp b1234`, `ollama 0.12.0`."""
    n_ctx_per_slot: int | None = None
    """Context window of one request, in tokens."""
    n_slots: int | None = None
    """Requests the server runs in parallel (llama.cpp slots)."""
    supports_slots: bool = False
    supports_tokenize: bool = False
    supports_prefill: bool = False
    """The server continues a reply the request started (`ChatRequest.prefill`) and reports
    top log-probabilities: what `--score-mode logprobs` needs."""
    chat_format: ChatFormat | None = None
    """The chat layout the server uses, when the harness knows it exactly."""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """What a run wants of one server, resolved (`harness.run.settings.RunConfig.spec_of`): the
    plain values a backend class builds itself from (`Backend.from_spec`)."""

    model: str = ""
    """The model to run or ask for; empty: the class's `default_model` (openai: the server's
    first model)."""
    base_url: str | None = None
    """The server's URL (openai, ollama); None: the backend's own default, where it has one."""
    n_ctx: int = 8192
    """Context of one request in tokens (one llama.cpp slot; Ollama's num_ctx)."""
    parallel: int = 1
    """Server slots (a server the backend starts)."""
    max_connections: int = 64
    """HTTP connections to keep open to this server (at least the requests in flight)."""
    server_flags: str = "ollama"
    """How a started llama.cpp server is launched: `ollama` or `harness`."""
    request_path: str | None = None
    """`chat`, `text` or `tokens` (llama.cpp); None: the backend's default."""
    swa_full: bool = False
    threads: int | None = None
    """CPU threads of a server the backend starts (None: llama.cpp's default)."""
    context_from_server: bool = False
    """Use (and read) the context the server loads with instead of `n_ctx` (Ollama, when
    nothing set a context)."""


class Backend(ABC):
    """A model server the harness can talk to. Use as `async with backend:`."""

    name: ClassVar[str] = ""
    default_model: ClassVar[str] = ""
    """The model a run on this backend uses when none is named ("": the server's choice)."""
    default_profile: ClassVar[str] = "embedded"
    """The scenario profile (and harness.yaml profile) a run on this backend reads by default."""
    runs: ClassVar[bool] = True
    """Whether a run may name it (`--backend`); a pool is put together by the run itself."""
    order: ClassVar[int] = 100
    """Where it stands in lists of backends (help texts, error messages)."""
    _registry: ClassVar[dict[str, type[Backend]]] = {}

    info: ServerInfo

    @classmethod
    def register(cls, name: str, *, order: int = 100, runs: bool = True) -> Callable[[B], B]:
        """Class decorator: make a backend available to `Backend.create(name)` and, unless
        `runs` is False, to runs (`--backend name`), listed at `order`."""

        def deco(klass: B) -> B:
            klass.name = name
            klass.order = order
            klass.runs = runs
            cls._registry[name] = klass
            return klass

        return deco

    @classmethod
    def names(cls) -> list[str]:
        return sorted(cls._registry)

    @classmethod
    def runnable(cls) -> list[str]:
        """The backends a run may name, in the order lists show them."""
        found = [k for k in cls._registry.values() if k.runs]
        return [k.name for k in sorted(found, key=lambda k: (k.order, k.name))]

    @classmethod
    def class_of(cls, name: str) -> type[Backend]:
        """The class registered as `name`; ConfigError naming the known ones otherwise."""
        try:
            return cls._registry[name]
        except KeyError:
            raise ConfigError(
                f"unknown backend {name!r}; choose one of: {', '.join(sorted(cls._registry))}"
            ) from None

    @classmethod
    def create(cls, name: str, **options: Any) -> Backend:
        """Build the backend registered as `name` with its options."""
        return cls.class_of(name)(**options)

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        """This backend, not started, for a run's resolved settings (one server)."""
        raise ConfigError(f"the {cls.name!r} backend cannot be built from a run's settings")

    def reach(self) -> dict[str, Any]:
        """How another process reaches this started backend's server (the Ray executor's
        actors): `kind` (a registered name) and the options `Backend.create(kind, ...)` takes
        to talk to it, never to start a new server."""
        raise ConfigError(f"--executor ray cannot reach a {self.name!r} backend from its actors")

    @abstractmethod
    async def start(self) -> None:
        """Connect (and for managed servers, launch); raise BackendError with what to do."""

    @abstractmethod
    async def stop(self) -> None:
        """Release connections (and stop a managed server). Safe to call twice."""

    @abstractmethod
    async def health(self) -> bool:
        """True when the server answers and is ready for requests."""

    @abstractmethod
    async def chat(self, request: ChatRequest) -> ChatResult:
        """Run one chat completion."""

    async def chat_many(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Several requests that differ only in their prompts' ends (the probes of one row in
        `--score-mode logprobs`), answered in order. Here one after another; llama.cpp's
        `/completion` takes them in one call."""
        return [await self.chat(r) for r in requests]

    async def model_geometry(self) -> ModelGeometry | None:
        """The served model's geometry (layers, KV heads, ...), when the backend can tell."""
        return None

    async def tokenize(
        self, texts: Sequence[str], parse_special: bool = False
    ) -> Sequence[Sequence[int]]:
        """Token ids of each text, by the server's own tokenizer, with no BOS added;
        `parse_special` reads special-token text (`<start_of_turn>`) as those tokens."""
        raise NotImplementedError(f"backend {self.name!r} cannot tokenize")

    def memory_probe(self) -> MemoryProbe | None:
        """A probe for the memory the served model uses, when there is one."""
        return None

    def gpu_probe(self) -> MemoryProbe | None:
        """An NVML probe of the GPU the server runs on, when it runs on this machine's GPU
        (read from the device, not from the server's own accounting); None otherwise."""
        return None

    async def __aenter__(self) -> Backend:
        try:
            await self.start()
        except BaseException:
            await self.stop()  # a failed start must not leak connections or a child process
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
