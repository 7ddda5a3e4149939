"""Test infrastructure, for the harness's own tests and for users of the reliability suite:

- `doubles`: `InProcessDouble`, a zero-latency in-process stand-in for a llama.cpp server
  (logic tests and the engine's own benchmarks; its numbers are never measurements);
- `faults`: `FaultProxy`, a seeded fault-injecting HTTP proxy for loopback reliability tests
  (500/503, resets, stalls, truncated bodies, exact accounting);
- `seams`: `ApiSeams`, the points at which a test holds a `harness api` batch (the service
  reads no test hook from its environment).
"""

from harness.testing.doubles import DOUBLE_LABEL, InProcessDouble, quad_tokenize
from harness.testing.faults import FaultConfig, FaultProxy
from harness.testing.seams import RELEASE_NAME, ApiSeams

__all__ = [
    "DOUBLE_LABEL",
    "RELEASE_NAME",
    "ApiSeams",
    "FaultConfig",
    "FaultProxy",
    "InProcessDouble",
    "quad_tokenize",
]
