"""Test infrastructure, for the harness's own tests and for users of the reliability suite:

- `doubles`: `InProcessDouble`, a zero-latency in-process stand-in for a llama.cpp server
  (logic tests and the engine's own benchmarks; its numbers are never measurements);
- `faults`: `FaultProxy`, a seeded fault-injecting HTTP proxy for loopback reliability tests
  (500/503, resets, stalls, truncated bodies, exact accounting).
"""

from harness.testing.doubles import DOUBLE_LABEL, InProcessDouble, quad_tokenize
from harness.testing.faults import FaultConfig, FaultProxy

__all__ = ["DOUBLE_LABEL", "FaultConfig", "FaultProxy", "InProcessDouble", "quad_tokenize"]
