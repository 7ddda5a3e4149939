"""Memory probes, one interface, every sample labelled with where it came from.

- `ProcessRSSProbe`: resident memory of a server process (psutil), for the embedded backend.
- `NvmlProbe`: GPU memory through NVML (`pynvml` from nvidia-ml-py): device used/total, or one
  process's use; also board power and energy for the cost estimate.
- `OllamaPsProbe`: what Ollama's `/api/ps` says a loaded model occupies (`size`, `size_vram`);
  `size_vram < size` means part of the model spilled to system memory.

`MemoryMonitor` samples a probe on a background thread so a run records memory over time (peaks,
leak slopes) without the engine knowing about memory at all.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

import httpx
import psutil

from harness.errors import BackendError, BackendUnreachable, ModelNotFound, ProtocolError

__all__ = [
    "EnergyMeter",
    "MemoryMonitor",
    "MemoryProbe",
    "MemorySample",
    "NvmlProbe",
    "NvmlUnavailable",
    "OllamaPsProbe",
    "ProcessRSSProbe",
    "is_loopback_url",
    "local_gpu_probe",
    "normalise_ollama_host",
    "system_memory_bytes",
]


@dataclass(frozen=True, slots=True)
class MemorySample:
    """One memory reading."""

    used_bytes: int
    """Bytes used by what the probe watches (a process, a device, a loaded model)."""
    source: str
    """Where the number came from, e.g. `rss:pid=4242`, `nvml:gpu0`, `ollama:/api/ps gemma3:12b`."""
    kind: str
    """`host` (system RAM, read from the process), `device` (GPU memory, read from the
    device), or `ollama` (Ollama's own accounting of a loaded model, not a reading)."""
    total_bytes: int | None = None
    """Capacity of the resource measured (device total, system RAM), when known."""
    timestamp: float = field(default_factory=time.time)
    """Unix time of the reading, in seconds."""
    detail: dict[str, Any] = field(default_factory=dict)
    """Source-specific extras (e.g. Ollama's `size`, `size_vram`, `spilled`)."""


class MemoryProbe(Protocol):
    """Anything that can take a memory reading."""

    @property
    def source(self) -> str: ...

    def sample(self) -> MemorySample: ...


def system_memory_bytes() -> int:
    """Total physical memory of this machine, in bytes."""
    return int(psutil.virtual_memory().total)


class ProcessRSSProbe:
    """Resident set size of one process (and, optionally, its children)."""

    def __init__(self, pid: int, *, include_children: bool = True) -> None:
        self.pid = pid
        self.include_children = include_children
        try:
            self._proc = psutil.Process(pid)
        except psutil.NoSuchProcess as exc:
            raise BackendError(f"no process with pid {pid} to measure") from exc

    @property
    def source(self) -> str:
        return f"rss:pid={self.pid}"

    def sample(self) -> MemorySample:
        try:
            rss = int(self._proc.memory_info().rss)
            if self.include_children:
                for child in self._proc.children(recursive=True):
                    try:
                        rss += int(child.memory_info().rss)
                    except psutil.NoSuchProcess:
                        continue
        except psutil.NoSuchProcess as exc:
            raise BackendError(f"process {self.pid} exited; its memory cannot be read") from exc
        return MemorySample(rss, self.source, "host", total_bytes=system_memory_bytes())


class NvmlUnavailable(RuntimeError):
    """NVML (an NVIDIA driver) is not present; GPU probes cannot run here."""


def load_nvml() -> ModuleType:
    """Import and initialise `pynvml`, or raise NvmlUnavailable saying why."""
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - dependency is declared
        raise NvmlUnavailable("pynvml is not installed (pip install nvidia-ml-py)") from exc
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # pynvml raises NVMLError subclasses built at run time
        raise NvmlUnavailable(
            f"no NVIDIA driver/GPU here: NVML did not initialise ({exc})"
        ) from exc
    module: ModuleType = pynvml
    return module


class NvmlProbe:
    """GPU memory via NVML: the whole device, or one process on it when `pid` is given.

    `nvml` is injectable so the logic is tested against a fake library; by default the real
    `pynvml` is loaded (NvmlUnavailable when there is no driver).
    """

    def __init__(
        self, device_index: int = 0, *, pid: int | None = None, nvml: Any | None = None
    ) -> None:
        self.nvml = nvml if nvml is not None else load_nvml()
        self.device_index = device_index
        self.pid = pid
        try:
            self._handle = self.nvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception as exc:
            raise NvmlUnavailable(f"NVML has no GPU {device_index}: {exc}") from exc

    @property
    def source(self) -> str:
        base = f"nvml:gpu{self.device_index}"
        return f"{base}:pid={self.pid}" if self.pid is not None else base

    def device_name(self) -> str:
        name = self.nvml.nvmlDeviceGetName(self._handle)
        return name.decode() if isinstance(name, bytes) else str(name)

    def processes(self) -> list[dict[str, Any]] | None:
        """GPU memory of each compute process on the device (None when the driver cannot
        tell: `usedGpuMemory` is None in many containers)."""
        try:
            procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:
            return None
        out = [
            {"pid": int(p.pid), "used_bytes": int(p.usedGpuMemory)}
            for p in procs
            if getattr(p, "usedGpuMemory", None) is not None
        ]
        return out if out or not procs else None

    def sample(self) -> MemorySample:
        info = self.nvml.nvmlDeviceGetMemoryInfo(self._handle)
        used = int(info.used)
        detail: dict[str, Any] = {"device_used_bytes": used}
        procs = self.processes()
        if procs is not None:
            detail["processes"] = procs
        if self.pid is not None:
            mine = [p["used_bytes"] for p in procs or [] if p["pid"] == self.pid]
            if mine:
                used = sum(mine)
            else:
                detail["per_process_unavailable"] = True
        return MemorySample(used, self.source, "device", total_bytes=int(info.total), detail=detail)

    def total_bytes(self) -> int:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self._handle).total)

    def power_watts(self) -> float:
        """Board power draw now, in watts (NVML reports milliwatts)."""
        return float(self.nvml.nvmlDeviceGetPowerUsage(self._handle)) / 1000.0

    def energy_joules(self) -> float | None:
        """Energy counter since driver load, in joules (NVML: millijoules); None if unsupported."""
        try:
            return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)) / 1000.0
        except Exception:
            return None


def is_loopback_url(url: str) -> bool:
    """True when `url` points at this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    host = httpx.URL(url if "://" in url else f"http://{url}").host
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_gpu_probe(base_url: str, *, nvml: Any | None = None) -> NvmlProbe | None:
    """An NVML probe of GPU 0 when the server at `base_url` runs on this machine and this
    machine has an NVIDIA GPU; None otherwise (a remote server's GPU cannot be read here)."""
    if not is_loopback_url(base_url):
        return None
    try:
        return NvmlProbe(0, nvml=nvml)
    except NvmlUnavailable:
        return None


OLLAMA_DEFAULT_PORT = 11434


def normalise_ollama_host(host: str) -> str:
    """A base URL for an Ollama host written the way `OLLAMA_HOST` may be.

    As the `ollama` CLI and client read it: a bare host (`0.0.0.0`, `gpu-box`) or `:port` gets
    `http://` and, when it names no port, Ollama's 11434 (not http's 80); a URL with a scheme is
    kept as written.
    """
    host = host.strip().rstrip("/")
    if "://" in host:
        return host
    if host.startswith(":"):
        host = "127.0.0.1" + host
    url = httpx.URL("http://" + host)
    if url.port is None:
        url = url.copy_with(port=OLLAMA_DEFAULT_PORT)
    return str(url).rstrip("/")


def _model_names(model: str) -> set[str]:
    """Names `/api/ps` may list `model` under: Ollama adds `:latest` to an untagged name."""
    names = {model}
    if ":" not in model.rsplit("/", 1)[-1]:
        names.add(f"{model}:latest")
    return names


class OllamaPsProbe:
    """What Ollama says a loaded model occupies, from `GET /api/ps`."""

    def __init__(
        self,
        host: str,
        model: str,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.host = normalise_ollama_host(host)
        self.model = model
        self._client = httpx.Client(base_url=self.host, transport=transport, timeout=timeout)

    @property
    def source(self) -> str:
        return f"ollama:/api/ps {self.model}"

    def loaded(self) -> dict[str, Any]:
        """The `/api/ps` entry of the model (raises ModelNotFound when it is not loaded)."""
        try:
            resp = self._client.get("/api/ps")
            resp.raise_for_status()
        except httpx.TransportError as exc:
            raise BackendUnreachable(
                f"cannot reach Ollama at {self.host} for /api/ps ({exc}); is `ollama serve` up?",
                url=self.host,
            ) from exc
        except httpx.HTTPStatusError as exc:
            raise BackendError(
                f"{self.host}/api/ps answered {exc.response.status_code}", url=self.host
            ) from exc
        try:
            models = resp.json().get("models") or []
        except (ValueError, AttributeError) as exc:
            raise ProtocolError(
                f"{self.host}/api/ps sent an unexpected reply: {resp.text[:200]!r}", url=self.host
            ) from exc
        names = _model_names(self.model)
        for entry in models:
            if names & {entry.get("name"), entry.get("model")}:
                return dict(entry)
        raise ModelNotFound(
            f"model {self.model!r} is not loaded in Ollama at {self.host}", url=self.host
        )

    def sample(self) -> MemorySample:
        """The model's whole footprint (`size`): a model that spills to system memory does not
        get smaller, its GPU share (`size_vram`) does. Both are Ollama's own accounting."""
        entry = self.loaded()
        size = int(entry.get("size", 0))
        size_vram = int(entry.get("size_vram", 0))
        detail = {
            "size": size,
            "size_vram": size_vram,
            "spilled": size_vram < size,
            "context_length": entry.get("context_length"),
        }
        # Ollama's own accounting of the model (GPU part and, when spilled, system memory):
        # not a device reading.
        return MemorySample(size, self.source, "ollama", detail=detail)

    def close(self) -> None:
        self._client.close()


class EnergyMeter:
    """GPU energy over a run: the NVML energy counter's difference when the GPU has one, else
    board power sampled on a thread and integrated (trapezoids). A context manager."""

    def __init__(self, probe: NvmlProbe, interval_s: float = 1.0) -> None:
        self.probe = probe
        self.interval_s = interval_s
        self._start_j: float | None = None
        self._end_j: float | None = None
        self._power: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self._power.append((time.monotonic(), self.probe.power_watts()))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> EnergyMeter:
        self._start_j = self.probe.energy_joules()
        self._thread = threading.Thread(target=self._loop, name="energy-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._end_j = self.probe.energy_joules()

    @property
    def method(self) -> str:
        """How `watt_hours` was obtained: the energy counter, or power samples integrated."""
        if self._start_j is not None and self._end_j is not None:
            return "NVML energy counter"
        return f"NVML power, {len(self._power)} samples integrated"

    @property
    def watt_hours(self) -> float | None:
        """Energy used between enter and exit, in watt-hours (None if nothing was read)."""
        if self._start_j is not None and self._end_j is not None:
            return (self._end_j - self._start_j) / 3600.0
        pts = self._power
        if len(pts) < 2:
            return None
        joules = sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in itertools.pairwise(pts))
        return joules / 3600.0


class MemoryMonitor:
    """Samples a probe every `interval_s` on a daemon thread; a context manager.

    Failed readings (a process that died, a server that did not answer) are counted, not
    raised: memory watching must never bring a run down. A server that answered that the model
    is not loaded (yet: Ollama loads it with the first request; or again, after an unload) gave
    a reading, not a failure: those are counted apart, as `not_loaded`.
    """

    def __init__(
        self,
        probe: MemoryProbe | Callable[[], MemorySample],
        interval_s: float = 1.0,
    ) -> None:
        self._read = probe.sample if hasattr(probe, "sample") else probe
        self.interval_s = interval_s
        self.samples: list[MemorySample] = []
        self.failures = 0
        self.not_loaded = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample_now()
            self._stop.wait(self.interval_s)

    def sample_now(self) -> MemorySample | None:
        try:
            sample: MemorySample = self._read()
        except ModelNotFound:
            self.not_loaded += 1
            return None
        except Exception:
            self.failures += 1
            return None
        self.samples.append(sample)
        return sample

    def start(self) -> MemoryMonitor:
        if self._thread is None:
            # A monitor stopped before may be started again: clear the stop flag it left set.
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="memory-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.sample_now()

    def __enter__(self) -> MemoryMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def peak(self) -> MemorySample | None:
        return max(self.samples, key=lambda s: s.used_bytes, default=None)
