"""One job over several model servers: a pool of backends behind the one `Backend` contract.

The pool shows the runner the sum of its members' slots. The runner pins each worker to one
slot (`ChatRequest.slot`), and the pool maps that slot to (member, the member's own slot), the
members' slots interleaved (slot 0 on the first server, slot 1 on the second, ...), so any
concurrency spreads evenly. So:

- a worker's requests, its rolling conversation and the prefix its slot holds stay on one
  server (conversation affinity), and each server warms its own prefix cache;
- workers take the next row from the runner's shared queue when they finish, so each server
  gets rows at the rate it answers: a slow server gets fewer, a fast one more (the dispatch
  that sends each request to the server with the fewest requests in flight, each server with
  its own concurrency); a request without a slot goes to the live member with the fewest
  requests in flight.

A member that stops answering is taken out, and the run goes on without it:

- `BackendUnreachable` (nothing listens: a killed server) takes it out at once;
- another retryable failure (a reset, a 5xx, a timeout: what a request in flight on a server
  that dies sees) makes the pool ask the member's `/health`; a member that does not answer is
  taken out the same way, one that answers keeps the failure, which goes to the runner (its
  retries, on the same server);
- a member taken out gives its slots to the live members (the fewest slots per own slot
  first), and the request is sent again there at once: nothing is lost, and the results store
  keeps every id once;
- with no member left the pool raises `BackendUnreachable`: the runner retries, then the run
  stops (and resumes from the results file);
- every `health_interval_s` the members that are out are asked again; one that answers is taken
  back, and each of its slots returns to it when a conversation next starts on that slot
  (`ChatRequest.turn` 0: at once for stateless rows), never in the middle of one. A slot moves
  only when the member it is on leaves, so a conversation changes server only when its server
  dies.

Token counting and the model's geometry come from a live member. Each answer names its member
(`ChatResult.endpoint`, then `RequestRecord.endpoint` and `harness.endpoint` in the results),
and `endpoints()` gives each member's counts and history (when it left, why, after how many
requests, when it came back).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from harness.backends.base import Backend, ChatRequest, ChatResult, ServerInfo
from harness.errors import BackendUnreachable, ConfigError, HarnessError
from harness.memory import MemoryProbe, MemorySample
from harness.models.geometry import ModelGeometry

__all__ = ["EndpointState", "PoolBackend"]


@dataclass(slots=True)
class EndpointState:
    """One member of a pool and what happened to it."""

    name: str
    backend: Backend
    slots: int = 1
    """Requests it runs at once: its llama.cpp slots, else the pool's `per_endpoint`."""
    up: bool = True
    in_flight: int = 0
    requests: int = 0
    """Requests sent to it (every try)."""
    ok: int = 0
    failures: int = 0
    """Requests it failed (any error, an unreachable server included)."""
    down_at: float | None = None
    """When it was last taken out (Unix time); None while it has never left."""
    down_reason: str | None = None
    down_after: int | None = None
    """Requests the whole pool had answered when it left."""
    back_at: float | None = None
    """When it was last taken back after leaving."""
    events: list[dict[str, Any]] = field(default_factory=list)
    """Every change: {"event": "down" | "up", "at": Unix time, "reason": ...}."""
    missed: int = 0
    """Health checks missed in a row while up (`PoolBackend.misses_allowed` take it out)."""

    def begin_run(self) -> None:
        """Count from here (a pool that serves several runs reports each run's own figures);
        a member that is out stays out, with why."""
        self.requests = self.ok = self.failures = 0
        if self.up:
            self.down_at = self.down_reason = self.down_after = self.back_at = None
            self.events = []

    def figures(self) -> dict[str, Any]:
        return {
            "endpoint": self.name,
            "slots": self.slots,
            "up": self.up,
            "requests": self.requests,
            "ok": self.ok,
            "failures": self.failures,
            "down_at": self.down_at,
            "down_reason": self.down_reason,
            "down_after_requests": self.down_after,
            "back_at": self.back_at,
            "events": list(self.events),
        }


class _MembersProbe:
    """Each member's memory, read together: the sample is the largest member's (each server
    has its own card or process: a pool's memory is never a sum compared with one card's
    limit), with every member's reading and whether any spilled in `detail`. A dead member is
    skipped (and named in `detail["unread"]`)."""

    def __init__(self, probes: Sequence[MemoryProbe]) -> None:
        self.probes = list(probes)

    @property
    def source(self) -> str:
        return "each of " + ", ".join(p.source for p in self.probes)

    def sample(self) -> MemorySample:
        samples: list[MemorySample] = []
        unread: list[str] = []
        for probe in self.probes:
            try:
                samples.append(probe.sample())
            except Exception:
                unread.append(probe.source)
        if not samples:
            raise BackendUnreachable("no server of the pool can be measured")
        top = max(samples, key=lambda s: s.used_bytes)
        detail: dict[str, Any] = {
            "members": [
                {"source": s.source, "used_bytes": s.used_bytes, "spilled": s.detail.get("spilled")}
                for s in samples
            ],
            "sum_bytes": sum(s.used_bytes for s in samples),
            "unread": unread,
        }
        if any("spilled" in s.detail for s in samples):
            detail["spilled"] = any(bool(s.detail.get("spilled")) for s in samples)
        return MemorySample(
            used_bytes=top.used_bytes,
            source=f"largest of {len(samples)} servers: {top.source}",
            kind=top.kind,
            total_bytes=top.total_bytes,
            detail=detail,
        )


@Backend.register("pool", runs=False)
class PoolBackend(Backend):
    """Several servers of one model as one backend; see the module docstring."""

    def __init__(
        self,
        members: Sequence[Backend],
        *,
        per_endpoint: int = 1,
        health_interval_s: float = 5.0,
        health_timeout_s: float = 5.0,
        layout: str = "interleave",
        misses_allowed: int = 2,
    ) -> None:
        if not members:
            raise ConfigError("a pool needs at least one server")
        if per_endpoint < 1:
            raise ConfigError(f"a pool needs at least 1 request per server, not {per_endpoint}")
        if layout not in ("interleave", "fill"):
            raise ConfigError(f"a pool's layout is interleave or fill, not {layout!r}")
        self.members = list(members)
        self.layout = layout
        """How global slots map to members: `interleave` (slot 0 on the first server, slot 1
        on the second, ...: any concurrency spreads evenly) or `fill` (every slot of the first
        server, then the second's: a client whose concurrency is the first server's slots uses
        only it, and the others only when it leaves — the Ray executor's actors)."""
        self.per_endpoint = per_endpoint
        """Requests in flight on a member that has no llama.cpp slots (Ollama, vLLM)."""
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.misses_allowed = misses_allowed
        """Health checks a live member may miss in a row before it is taken out (a hung
        server that still accepts connections); 0: live members are not checked."""
        self._eps: list[EndpointState] = []
        self._home: list[tuple[int, int | None]] = []
        """Global slot -> (member, its own slot) while every member is up."""
        self._route: list[tuple[int, int | None]] = []
        """Global slot -> (member, its own slot) now: only live members."""
        self._answered = 0
        self._started = False
        self._used: set[int] = set()
        self._shared: dict[int, int] = {}
        """Global slots that requests have used (a moved slot avoids the local slots these
        are on)."""
        self._watch: asyncio.Task[None] | None = None
        first = self.members[0].info
        self.info = ServerInfo(
            backend=first.backend,
            base_url=",".join(m.info.base_url for m in self.members),
            model=first.model,
            chat_format=first.chat_format,
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every member. Once started, a second call (the API worker's after a failed
        batch) restarts what is out: see `_start_again`."""
        if self._started:
            await self._start_again()
            return
        outcomes = await asyncio.gather(*(m.start() for m in self.members), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        infos = [m.info for m in self.members]
        models = {i.model for i in infos}
        if len(models) > 1:
            raise ConfigError(
                "the servers of a pool must serve one model; they serve: "
                + ", ".join(f"{i.base_url}: {i.model}" for i in infos)
            )
        urls = [i.base_url for i in infos]
        names = [f"{u}#{k}" if urls.count(u) > 1 else u for k, u in enumerate(urls)]
        self._eps = [
            EndpointState(name, m, slots=self._slots_of(m.info))
            for name, m in zip(names, self.members, strict=True)
        ]
        self._home = self._interleave()
        self._route = list(self._home)
        self._used = set()
        self._shared = {}
        self._answered = 0
        self._started = True
        first = infos[0]
        self.info = ServerInfo(
            backend=first.backend,
            base_url=",".join(names),
            model=first.model,
            server=f"{len(infos)} × {first.server}",
            n_ctx_per_slot=min((i.n_ctx_per_slot for i in infos if i.n_ctx_per_slot), default=None),
            n_slots=len(self._home),
            supports_slots=True,
            supports_tokenize=all(i.supports_tokenize for i in infos),
            chat_format=first.chat_format,
            extra={**first.extra, "endpoints": names, "pool": True},
        )
        if self.health_interval_s > 0:
            self._watch = asyncio.create_task(self._watch_loop(), name="pool-health")

    async def _start_again(self) -> None:
        """Each member that does not answer its health check is started again (an embedded
        member relaunches a server that died; a remote one is asked again) and taken back if
        it then answers; one that cannot start stays out, with the reason. Raises when no
        member answers: the pool has nothing to run on."""
        for i, e in enumerate(self._eps):
            if await self._healthy(e):
                if not e.up:
                    self._mark_up(i)
                continue
            try:
                await e.backend.start()
            except Exception as exc:  # its reason, kept; the other members go on
                self._still_down(i, f"could not start again: {exc}")
                continue
            if await self._healthy(e):
                self._mark_up(i)
            else:
                self._still_down(i, "started again, but does not answer its health check")
        if not self.live:
            raise self._none_left()

    def _slots_of(self, info: ServerInfo) -> int:
        if info.supports_slots and info.n_slots:
            return int(info.n_slots)
        return self.per_endpoint

    def _interleave(self) -> list[tuple[int, int | None]]:
        out: list[tuple[int, int | None]] = []
        if self.layout == "fill":
            for i, e in enumerate(self._eps):
                own = e.backend.info.supports_slots
                out.extend((i, local if own else None) for local in range(e.slots))
            return out
        for local in range(max(e.slots for e in self._eps)):
            for i, e in enumerate(self._eps):
                if local < e.slots:
                    out.append((i, local if e.backend.info.supports_slots else None))
        return out

    async def stop(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch
        outcomes = await asyncio.gather(*(m.stop() for m in self.members), return_exceptions=True)
        self._started = False  # `endpoints()` still tells this run's story; start() anew
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome

    async def health(self) -> bool:
        return self._started and any(e.up for e in self._eps)

    # -- routing ---------------------------------------------------------------------------

    @property
    def live(self) -> list[EndpointState]:
        return [e for e in self._eps if e.up]

    def begin_run(self) -> None:
        """A run starts: each member's counts and history from here (see
        `EndpointState.begin_run`)."""
        self._answered = 0
        for e in self._eps:
            e.begin_run()

    def endpoints(self) -> list[dict[str, Any]]:
        """Each member's figures and history (see `EndpointState`)."""
        return [e.figures() for e in self._eps]

    def endpoint_of(self, slot: int) -> str:
        """The member a global slot is routed to now."""
        return self._eps[self._route[slot % len(self._route)][0]].name

    def _none_left(self) -> BackendUnreachable:
        return BackendUnreachable(
            "no server of the pool is left: "
            + "; ".join(f"{e.name}: {e.down_reason}" for e in self._eps)
        )

    def _move(self, g: int) -> tuple[int, int | None]:
        """Route global slot `g` (its member and its home are out) to the live member with the
        fewest slots routed to it per own slot; it stays there until that member leaves or a
        conversation starts on it while its home is back."""
        live = [i for i, e in enumerate(self._eps) if e.up]
        if not live:
            raise self._none_left()
        load = dict.fromkeys(live, 0)
        for i, _ in self._route:
            if i in load:
                load[i] += 1
        j = min(live, key=lambda k: (load[k] / self._eps[k].slots, k))
        e = self._eps[j]
        if not e.backend.info.supports_slots:
            self._route[g] = (j, None)
            return self._route[g]
        # The local slot of j that the fewest slots in use are on (an idle one if any), so a
        # moved conversation does not queue behind, and evict, one that is running there.
        busy = dict.fromkeys(range(e.slots), 0)
        for h in self._used:
            i, local = self._route[h]
            if h != g and i == j and local is not None:
                busy[local] += 1
        k = min(busy, key=lambda k: (busy[k], k))
        self._route[g] = (j, k if busy[k] == 0 else None)  # never pinned onto a slot in use
        return self._route[g]

    def _pick(self, slot: int | None, turn: int | None = None) -> tuple[int, int | None]:
        """The member (and its own slot) for a request on global `slot`.

        A slot stays on its member while that member is up, so a conversation never changes
        server while its server answers. A slot whose member left moves (`_move`); a moved slot
        goes back home when its home is up again and a conversation starts on it (`turn` 0, or
        not told), never in the middle of one."""
        if slot is not None and self._route:
            g = slot % len(self._route)
            if g not in self._used:
                self._used.add(g)
                self._recount()
            i, local = self._route[g]
            home = self._home[g]
            away = (i, local) != home
            if away and self._eps[home[0]].up and (not self._eps[i].up or not turn):
                self._route[g] = home
                self._recount()
                i, local = home
            elif not self._eps[i].up:
                i, local = self._move(g)
                self._recount()
            return i, (None if self._shared.get(i, 0) > self._eps[i].slots else local)
        live = [i for i, e in enumerate(self._eps) if e.up]
        if not live:
            raise self._none_left()
        i = min(live, key=lambda k: (self._eps[k].in_flight / self._eps[k].slots, k))
        return i, None

    def _recount(self) -> None:
        """Slots in use routed to each member. A member with more of them than its own slots
        (slots moved onto it) gets every request unpinned: two requests pinned to one busy
        llama.cpp slot crash or wedge the server (harness.engine.runner's docstring)."""
        self._shared = {}
        for g in self._used:
            i = self._route[g][0]
            self._shared[i] = self._shared.get(i, 0) + 1

    def _mark_down(self, i: int, reason: str) -> None:
        e = self._eps[i]
        if not e.up:
            return
        e.up = False
        e.down_at = time.time()
        e.down_reason = reason
        e.down_after = self._answered
        e.events.append({"event": "down", "at": e.down_at, "reason": reason})

    def _still_down(self, i: int, reason: str) -> None:
        """Out, for `reason` now (a member already out keeps its `down_at`; the event says
        what was tried)."""
        if self._eps[i].up:
            self._mark_down(i, reason)
            return
        e = self._eps[i]
        e.down_reason = reason
        e.events.append({"event": "start failed", "at": time.time(), "reason": reason})

    def _mark_up(self, i: int) -> None:
        e = self._eps[i]
        if e.up:
            return
        e.up = True
        e.missed = 0
        e.back_at = time.time()
        e.events.append({"event": "up", "at": e.back_at, "reason": "answers its health check"})

    async def _healthy(self, e: EndpointState) -> bool:
        try:
            async with asyncio.timeout(self.health_timeout_s):
                return await e.backend.health()
        except Exception:
            return False

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_health()

    async def check_health(self) -> None:
        """Ask every member (what the watch does every `health_interval_s`): one that is out
        and answers is taken back; one that is up and misses `misses_allowed` checks in a row
        (a hung server that still accepts connections) is taken out."""
        for i, e in enumerate(self._eps):
            if not e.up:
                if await self._healthy(e):
                    self._mark_up(i)
                continue
            if self.misses_allowed <= 0:
                continue
            if await self._healthy(e):
                e.missed = 0
                continue
            e.missed += 1
            if e.missed >= self.misses_allowed:
                self._mark_down(
                    i,
                    f"missed {e.missed} health checks in a row",
                )

    # -- requests --------------------------------------------------------------------------

    async def chat(self, request: ChatRequest) -> ChatResult:
        slot = request.slot
        while True:
            i, local = self._pick(slot, request.turn)
            e = self._eps[i]
            sub = request if local == request.slot else replace(request, slot=local)
            e.in_flight += 1
            e.requests += 1
            try:
                result = await e.backend.chat(sub)
            except BackendUnreachable as exc:
                e.in_flight -= 1
                e.failures += 1
                self._mark_down(i, f"{type(exc).__name__}: {exc}")
                continue  # sent again at once, on a live member
            except HarnessError as exc:
                e.in_flight -= 1
                e.failures += 1
                if exc.retryable and e.up and not await self._healthy(e):
                    self._mark_down(i, f"{type(exc).__name__}: {exc}; then no answer to /health")
                if not e.up:
                    continue
                exc.endpoint = e.name  # type: ignore[attr-defined]  # the runner records it
                raise
            except BaseException:
                e.in_flight -= 1
                raise
            e.in_flight -= 1
            e.ok += 1
            self._answered += 1
            result.endpoint = e.name
            result.slot = slot
            return result

    def _first_live(self) -> list[tuple[int, EndpointState]]:
        live = [(i, e) for i, e in enumerate(self._eps) if e.up]
        if not live:
            raise BackendUnreachable("no server of the pool is left to ask")
        return live

    async def tokenize(
        self, texts: Sequence[str], parse_special: bool = False
    ) -> Sequence[Sequence[int]]:
        while True:
            i, e = self._first_live()[0]
            try:
                return await e.backend.tokenize(texts, parse_special)
            except BackendUnreachable as exc:
                self._mark_down(i, f"{type(exc).__name__}: {exc}")

    async def model_geometry(self) -> ModelGeometry | None:
        for _, e in self._first_live():
            with contextlib.suppress(HarnessError):
                return await e.backend.model_geometry()
        return None

    def memory_probe(self) -> MemoryProbe | None:
        probes = []
        for m in self.members:
            with contextlib.suppress(Exception):
                probe = m.memory_probe()
                if probe is not None:
                    probes.append(probe)
        return _MembersProbe(probes) if probes else None
