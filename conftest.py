"""The project's root conftest: what every suite and test of this checkout shares.

The harness's pytest plugin (`harness.pytest.plugin`) is registered by the installed package's
`pytest11` entry point (`make install`, `pip install -e .`). In a checkout where the package is
importable but not installed (`PYTHONPATH=. pytest suites/...`), this registers it instead, so
the suites' options and the `harness` fixture are there either way.
"""

from __future__ import annotations

from importlib.metadata import entry_points

_installed = any(ep.value == "harness.pytest.plugin" for ep in entry_points(group="pytest11"))
if not _installed:
    pytest_plugins = ["harness.pytest.plugin"]
