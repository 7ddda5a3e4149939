"""Memory probes and the background monitor.

ProcessRSSProbe runs on real processes (this one and short-lived children); NvmlProbe on a fake
NVML library (there is no GPU here); OllamaPsProbe on Ollama-shaped `/api/ps` replies from
tests/data/ollama/recorded/ (bodies recorded from real servers) through `httpx.MockTransport`.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psutil
import pytest

from harness.errors import BackendError, BackendUnreachable, ModelNotFound, ProtocolError
from harness.memory import (
    MemoryMonitor,
    MemorySample,
    NvmlProbe,
    NvmlUnavailable,
    OllamaPsProbe,
    ProcessRSSProbe,
    load_nvml,
    system_memory_bytes,
)

DATA = Path(__file__).parent / "data" / "ollama" / "recorded"
URL = "http://ollama.test:11434"
MODEL = "gemma3:12b"
GIB = 1024**3


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / name).read_text(encoding="utf-8"))
    return data


# -- ProcessRSSProbe ---------------------------------------------------------------------------


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A child Python process that sleeps until the test ends it."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_rss_of_this_process() -> None:
    probe = ProcessRSSProbe(os.getpid(), include_children=False)
    sample = probe.sample()
    assert sample.used_bytes > 0
    assert str(os.getpid()) in sample.source
    assert sample.source == probe.source == f"rss:pid={os.getpid()}"
    assert sample.kind == "host"
    assert sample.total_bytes == system_memory_bytes()
    assert sample.used_bytes < sample.total_bytes
    assert sample.timestamp == pytest.approx(time.time(), abs=60)


def test_rss_includes_children_when_asked(sleeper: subprocess.Popen[bytes]) -> None:
    child_rss = psutil.Process(sleeper.pid).memory_info().rss
    assert child_rss > 0
    alone = ProcessRSSProbe(os.getpid(), include_children=False).sample().used_bytes
    family = ProcessRSSProbe(os.getpid(), include_children=True).sample().used_bytes
    assert family - alone > child_rss // 2


def test_dead_pid_raises_backend_error() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    with pytest.raises(BackendError, match=f"pid {proc.pid}"):
        ProcessRSSProbe(proc.pid)


def test_process_that_exits_after_the_probe_is_made_raises_backend_error(
    sleeper: subprocess.Popen[bytes],
) -> None:
    probe = ProcessRSSProbe(sleeper.pid)
    assert probe.sample().used_bytes > 0
    sleeper.kill()
    sleeper.wait(timeout=10)
    with pytest.raises(BackendError, match="exited"):
        probe.sample()


# -- NvmlProbe ---------------------------------------------------------------------------------


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


class FakeNvml:
    """The few pynvml functions NvmlProbe calls, for one GPU, with fixed readings."""

    def __init__(
        self,
        *,
        used: int = 30 * GIB,
        total: int = 80 * GIB,
        procs: Sequence[tuple[int, int | None]] = (),
        power_mw: int = 312_456,
        energy_mj: int | None = 123_456_789,
        name: bytes | str = b"NVIDIA H100 80GB HBM3",
    ) -> None:
        self.used, self.total = used, total
        self.procs = list(procs)
        self.power_mw, self.energy_mj, self.name = power_mw, energy_mj, name
        self.handles: list[Any] = []

    def nvmlDeviceGetHandleByIndex(self, index: int) -> tuple[str, int]:
        if index != 0:
            raise FakeNVMLError("Invalid Argument")
        return ("gpu", index)

    def _check(self, handle: Any) -> None:
        assert handle == ("gpu", 0), "the probe must pass the handle it got"
        self.handles.append(handle)

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> SimpleNamespace:
        self._check(handle)
        return SimpleNamespace(used=self.used, total=self.total, free=self.total - self.used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[SimpleNamespace]:
        self._check(handle)
        return [SimpleNamespace(pid=pid, usedGpuMemory=mem) for pid, mem in self.procs]

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        self._check(handle)
        return self.power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        self._check(handle)
        if self.energy_mj is None:
            raise FakeNVMLError("Not Supported")
        return self.energy_mj

    def nvmlDeviceGetName(self, handle: Any) -> bytes | str:
        self._check(handle)
        return self.name


def test_nvml_device_sample() -> None:
    nvml = FakeNvml(used=30 * GIB, total=80 * GIB)
    probe = NvmlProbe(0, nvml=nvml)
    sample = probe.sample()
    assert sample.used_bytes == 30 * GIB
    assert sample.total_bytes == 80 * GIB == probe.total_bytes()
    assert sample.kind == "device"
    assert sample.source == probe.source == "nvml:gpu0"
    assert sample.detail == {"device_used_bytes": 30 * GIB, "processes": []}
    assert nvml.handles  # it read through the device handle


def test_nvml_per_process_sample() -> None:
    nvml = FakeNvml(used=30 * GIB, procs=[(999, 2 * GIB), (4242, 21 * GIB)])
    probe = NvmlProbe(0, pid=4242, nvml=nvml)
    sample = probe.sample()
    assert sample.used_bytes == 21 * GIB
    assert sample.source == "nvml:gpu0:pid=4242"
    assert sample.detail["device_used_bytes"] == 30 * GIB
    assert "per_process_unavailable" not in sample.detail


def test_nvml_per_process_unavailable_falls_back_to_device_used() -> None:
    # In containers the driver often cannot attribute memory: usedGpuMemory comes back None.
    nvml = FakeNvml(used=30 * GIB, procs=[(4242, None)])
    sample = NvmlProbe(0, pid=4242, nvml=nvml).sample()
    assert sample.used_bytes == 30 * GIB
    assert sample.detail["per_process_unavailable"] is True


def test_nvml_power_in_watts_and_energy_in_joules() -> None:
    probe = NvmlProbe(0, nvml=FakeNvml(power_mw=312_456, energy_mj=123_456_789))
    assert probe.power_watts() == pytest.approx(312.456)
    assert probe.energy_joules() == pytest.approx(123_456.789)


def test_nvml_energy_unsupported_is_none() -> None:
    assert NvmlProbe(0, nvml=FakeNvml(energy_mj=None)).energy_joules() is None


@pytest.mark.parametrize("name", [b"NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"])
def test_nvml_device_name_bytes_or_str(name: bytes | str) -> None:
    assert NvmlProbe(0, nvml=FakeNvml(name=name)).device_name() == "NVIDIA H100 80GB HBM3"


def test_nvml_missing_device_raises_nvml_unavailable() -> None:
    with pytest.raises(NvmlUnavailable, match="GPU 3"):
        NvmlProbe(3, nvml=FakeNvml())


def _nvml_present() -> bool:
    try:
        nvml = load_nvml()
    except NvmlUnavailable:
        return False
    nvml.nvmlShutdown()
    return True


def test_load_nvml_without_a_gpu_raises_nvml_unavailable() -> None:
    if _nvml_present():
        pytest.skip("an NVIDIA driver is present here; NVML loads")
    with pytest.raises(NvmlUnavailable, match=r"NVML|pynvml"):
        load_nvml()
    with pytest.raises(NvmlUnavailable):
        NvmlProbe(0)  # the default loads the real library


# -- OllamaPsProbe -----------------------------------------------------------------------------


def ps_probe(
    status: int | None = 200,
    body: Any = None,
    *,
    model: str = MODEL,
    host: str = URL,
    error: Exception | None = None,
) -> tuple[OllamaPsProbe, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if error is not None:
            raise error
        assert request.method == "GET"
        assert request.url.path == "/api/ps"
        if isinstance(body, str):
            return httpx.Response(status or 200, text=body)
        return httpx.Response(status or 200, json=body)

    return OllamaPsProbe(host, model, transport=httpx.MockTransport(handler)), seen


LOADED = "ps_all_vram_gemma3n_e2b_v0.11.5.json"  # recorded: size_vram == size
SPILLED = "ps_spilled_mistral_7b_v0.11.6.json"  # recorded: size_vram < size


def test_ollama_ps_fully_loaded() -> None:
    body = load(LOADED)
    entry = body["models"][0]
    probe, seen = ps_probe(body=body, model=entry["name"])
    try:
        sample = probe.sample()
    finally:
        probe.close()
    assert len(seen) == 1
    assert sample.used_bytes == entry["size"] == entry["size_vram"]
    assert sample.kind == "ollama"  # Ollama's own accounting, not a device reading
    assert sample.source == probe.source == f"ollama:/api/ps {entry['name']}"
    assert sample.detail == {
        "size": entry["size"],
        "size_vram": entry["size_vram"],
        "spilled": False,
        "context_length": entry["context_length"],
    }


def test_ollama_ps_spilled_to_system_memory() -> None:
    probe, _ = ps_probe(body=load(SPILLED), model="mistral:7b")
    try:
        sample = probe.sample()
    finally:
        probe.close()
    # The whole footprint: a spilled model does not shrink, its GPU share does.
    assert sample.used_bytes == 8329906176
    assert sample.detail["size_vram"] == 7206864896
    assert sample.detail["spilled"] is True
    assert sample.detail["context_length"] == 16384


def test_ollama_ps_without_context_length() -> None:
    # An older server (nirmato/nirmato-ollama#13): no context_length in /api/ps.
    probe, _ = ps_probe(body=load("ps_all_vram_gemma3_no_context_length.json"), model="gemma3")
    sample = probe.sample()
    probe.close()
    assert sample.detail["context_length"] is None
    assert sample.detail["spilled"] is False


@pytest.mark.parametrize(
    ("body", "model"),
    [({"models": []}, MODEL), (LOADED, "llama3.1:8b"), (SPILLED, "gemma3")],
)
def test_ollama_ps_model_not_loaded_raises_model_not_found(body: Any, model: str) -> None:
    probe, _ = ps_probe(body=load(body) if isinstance(body, str) else body, model=model)
    with pytest.raises(ModelNotFound) as info:
        probe.sample()
    probe.close()
    assert repr(model) in str(info.value)
    assert URL in str(info.value)


def test_ollama_ps_untagged_model_matches_latest() -> None:
    # Ollama lists a model pulled as `gemma3` under `gemma3:latest` (as the recording shows).
    body = load("ps_all_vram_gemma3_no_context_length.json")
    probe, _ = ps_probe(body=body, model="gemma3")
    assert probe.sample().used_bytes == 5964735424
    probe.close()


def test_ollama_ps_unreachable_names_the_url() -> None:
    probe, seen = ps_probe(error=httpx.ConnectError("[Errno 111] Connection refused"))
    with pytest.raises(BackendUnreachable) as info:
        probe.sample()
    probe.close()
    assert len(seen) == 1
    assert URL in str(info.value)
    assert info.value.url == URL


def test_ollama_ps_http_error_raises_backend_error() -> None:
    probe, _ = ps_probe(500, {"error": "internal"})
    with pytest.raises(BackendError, match="500") as info:
        probe.sample()
    probe.close()
    assert info.value.url == URL


def test_ollama_ps_non_json_raises_protocol_error() -> None:
    probe, _ = ps_probe(200, "<html>proxy login</html>")
    with pytest.raises(ProtocolError, match="proxy login"):
        probe.sample()
    probe.close()


def test_ollama_ps_host_written_like_ollama_host() -> None:
    probe, seen = ps_probe(body=load(SPILLED), host="0.0.0.0", model="mistral:7b")
    probe.sample()
    probe.close()
    assert probe.host == "http://0.0.0.0:11434"
    assert str(seen[0].url) == "http://0.0.0.0:11434/api/ps"


# -- MemoryMonitor -----------------------------------------------------------------------------


def fake_sample(used: int) -> MemorySample:
    return MemorySample(used, "test", "host")


def test_monitor_samples_a_callable_repeatedly() -> None:
    counter = itertools.count(1)
    with MemoryMonitor(lambda: fake_sample(next(counter)), interval_s=0.05) as monitor:
        time.sleep(0.3)
    n = len(monitor.samples)
    assert n >= 3, f"only {n} samples in 0.3 s at a 0.05 s interval"
    assert n <= 0.3 / 0.05 + 10
    values = [s.used_bytes for s in monitor.samples]
    assert values == sorted(values)  # taken in order, none lost
    assert monitor.failures == 0
    time.sleep(0.15)
    assert len(monitor.samples) == n  # stopped means stopped


def test_monitor_counts_failures_without_raising() -> None:
    def broken() -> MemorySample:
        raise BackendError("process 1234 exited; its memory cannot be read")

    with MemoryMonitor(broken, interval_s=0.05) as monitor:
        time.sleep(0.25)
    assert monitor.failures >= 3
    assert monitor.samples == []
    assert monitor.peak is None


def test_monitor_accepts_a_probe_object() -> None:
    class Probe:
        source = "fake"

        def sample(self) -> MemorySample:
            return fake_sample(7)

    monitor = MemoryMonitor(Probe(), interval_s=10)
    assert monitor.sample_now() == monitor.samples[0]
    assert monitor.samples[0].used_bytes == 7


def test_monitor_peak_is_the_largest_sample() -> None:
    values = iter([5 * GIB, 9 * GIB, 3 * GIB])
    monitor = MemoryMonitor(lambda: fake_sample(next(values)), interval_s=10)
    for _ in range(3):
        monitor.sample_now()
    assert monitor.peak is not None
    assert monitor.peak.used_bytes == 9 * GIB
    assert monitor.peak is monitor.samples[1]


def test_monitor_can_be_started_again_after_stop() -> None:
    counter = itertools.count()
    monitor = MemoryMonitor(lambda: fake_sample(next(counter)), interval_s=0.05)
    with monitor:
        time.sleep(0.2)
    first = len(monitor.samples)
    with monitor:
        time.sleep(0.2)
    assert len(monitor.samples) - first >= 3


# -- what a run reports of its memory: spill known or unknown, a pool's servers apart ----------


class _Fixed:
    def __init__(self, source: str, used: int, spilled: bool | None = None) -> None:
        self.source = source
        self.used = used
        self.spilled = spilled

    def sample(self) -> MemorySample:
        detail = {} if self.spilled is None else {"spilled": self.spilled}
        return MemorySample(self.used, self.source, "ollama", detail=detail)


class _Dead:
    source = "ollama:/api/ps dead"

    def sample(self) -> MemorySample:
        raise BackendUnreachable("gone")


def test_a_pool_keeps_each_servers_memory_and_spill_not_their_sum() -> None:
    from harness.backends.pool import _MembersProbe
    from harness.engine.job import _memory_summary

    probe = _MembersProbe([_Fixed("a", 9_000, False), _Fixed("b", 11_000, True), _Dead()])
    monitor = MemoryMonitor(probe, interval_s=60)
    monitor.sample_now()
    summary = _memory_summary(monitor)
    assert summary is not None
    assert summary["peak_bytes"] == 11_000  # the largest server, never 20,000 against one card
    assert summary["spilled"] is True  # any member
    assert summary["members_peak_bytes"] == {"a": 9_000, "b": 11_000}
    assert monitor.samples[0].detail["unread"] == ["ollama:/api/ps dead"]


def test_no_reading_is_not_not_spilled() -> None:
    from harness.engine.job import _memory_summary

    never = MemoryMonitor(_Dead(), interval_s=60)
    never.sample_now()
    summary = _memory_summary(never)
    assert summary is not None
    assert summary["spilled"] is None and summary["samples"] == 0
    assert summary["failed_readings"] == 1
    rss = MemoryMonitor(_Fixed("rss:pid=1", 5), interval_s=60)  # RSS cannot tell a spill
    rss.sample_now()
    assert (_memory_summary(rss) or {})["spilled"] is None
    told = MemoryMonitor(_Fixed("ollama", 5, spilled=False), interval_s=60)
    told.sample_now()
    assert (_memory_summary(told) or {})["spilled"] is False


def test_a_model_not_loaded_yet_is_a_reading_not_a_failure() -> None:
    def absent() -> MemorySample:
        raise ModelNotFound("model 'gemma3:12b' is not loaded in Ollama")

    monitor = MemoryMonitor(absent, interval_s=60)
    monitor.sample_now()
    assert monitor.not_loaded == 1 and monitor.failures == 0
