"""Read an NVIDIA GPU through the harness's own NVML probe, on a machine that has one.

    python scripts/nvml_probe.py [--hold-gib 8] [--seconds 5] [--json OUT.json]

What it reads, each figure with its source:
1. the device: name, total and used memory (`nvmlDeviceGetMemoryInfo`), the compute processes
   and their memory where the driver attributes it (`nvmlDeviceGetComputeRunningProcesses`);
2. the same while something holds GPU memory: this process allocates `--hold-gib` GiB with
   PyTorch or CuPy when either is installed (else it says nothing could), and reads the device
   and its own per-process figure again — the delta is what a model server's buffers look like
   to the harness;
3. energy over `--seconds` seconds through `EnergyMeter` (the NVML energy counter, or sampled
   board power), once idle and once under a matrix-multiply load when PyTorch can make one;
4. what `local_gpu_probe` answers for a server on this machine and for a remote one (the
   harness reads a GPU only when the server runs on this machine).

It needs the harness's `harness/memory.py` (with nvidia-ml-py, httpx, psutil); it does not
need the rest of the harness or a model. Exit 1 when there is no NVIDIA GPU (NVML unavailable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.memory import (
    EnergyMeter,
    NvmlProbe,
    NvmlUnavailable,
    local_gpu_probe,
)

GIB = 1024**3


def reading(probe: NvmlProbe) -> dict[str, Any]:
    s = probe.sample()
    return {
        "used_bytes": s.used_bytes,
        "total_bytes": s.total_bytes,
        "source": s.source,
        "detail": s.detail,
    }


def hold_memory(gib: float) -> tuple[Any, str]:
    """Allocate `gib` GiB on GPU 0 with PyTorch or CuPy; (handle, how) or (None, why not)."""
    n = int(gib * GIB)
    try:
        import torch

        if torch.cuda.is_available():
            buf = torch.empty(n, dtype=torch.uint8, device="cuda:0")
            buf.fill_(1)
            torch.cuda.synchronize()
            return buf, f"torch {torch.__version__}: torch.empty({n} bytes) on cuda:0"
    except ImportError:
        pass
    try:
        import cupy

        buf = cupy.ones(n, dtype=cupy.uint8)
        cupy.cuda.Device(0).synchronize()
        return buf, f"cupy {cupy.__version__}: cupy.ones({n} bytes)"
    except ImportError:
        pass
    return None, "neither torch (with CUDA) nor cupy is installed: nothing held GPU memory"


def energy(probe: NvmlProbe, seconds: float, load: bool) -> dict[str, Any]:
    how = "idle"
    with EnergyMeter(probe, interval_s=0.2) as meter:
        end = time.monotonic() + seconds
        if load:
            try:
                import torch

                a = torch.randn(8192, 8192, device="cuda:0", dtype=torch.bfloat16)
                n = 0
                while time.monotonic() < end:
                    a @ a
                    n += 1
                torch.cuda.synchronize()
                how = f"{n} bf16 8192x8192 matrix products"
            except ImportError:
                how = "idle (no torch for a load)"
        while time.monotonic() < end:
            time.sleep(0.05)
    counter = probe.energy_joules()
    return {
        "load": how,
        "seconds": seconds,
        "watt_hours": meter.watt_hours,
        "mean_watts": meter.watt_hours * 3600 / seconds if meter.watt_hours else None,
        "source": "nvml energy counter"
        if counter is not None
        else "nvml power samples, integrated",
        "power_now_watts": probe.power_watts(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--hold-gib", type=float, default=8.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", default=None, help="also write the readings to this file")
    args = parser.parse_args()
    try:
        device = NvmlProbe(0)
        mine = NvmlProbe(0, pid=os.getpid())
    except NvmlUnavailable as exc:
        print(f"nvml_probe: no NVIDIA GPU here: {exc}", file=sys.stderr)
        return 1
    out: dict[str, Any] = {"device": device.device_name(), "pid": os.getpid()}
    out["before"] = reading(device)
    held, how = hold_memory(args.hold_gib)
    out["hold"] = {"asked_bytes": int(args.hold_gib * GIB), "how": how}
    if held is not None:
        time.sleep(0.5)
        out["holding"] = reading(device)
        out["holding_this_process"] = reading(mine)
        out["holding_delta_bytes"] = out["holding"]["used_bytes"] - out["before"]["used_bytes"]
    out["energy_idle_or_holding"] = energy(device, args.seconds, load=False)
    out["energy_under_load"] = energy(device, args.seconds, load=True)
    del held
    out["local_gpu_probe"] = {
        "http://127.0.0.1:11434": (p := local_gpu_probe("http://127.0.0.1:11434")) and p.source,
        "http://gpu-box.example:11434": local_gpu_probe("http://gpu-box.example:11434"),
    }
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
