"""`harness api --stop-on-cache-miss`: a batch whose server stops reusing the rubric part way
fails with the `reuse_alarm` code, keeps every finished line and lists the rows not run, the
same rule `harness run --stop-on-cache-miss` follows (tests/test_reuse_alarm.py); without the
option the batch completes and the service prints the alarm.

Over the in-process double whose cache is lost from its 70th request on, served by the real
app in a thread and driven by the official `openai` client.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_api import (  # _close_clients: the autouse fixture closing each test's clients
    _close_clients,  # noqa: F401
    check_finished,
    client_for,
    create,
    double_settings,
    error_codes,
    in_thread_app,
    make_batch_file,
    wait_batch,
)
from test_reuse_alarm import K, LosingDouble

ROWS = 160


def _ids(batch_file: Path) -> list[str]:
    import json

    return [json.loads(line)["custom_id"] for line in batch_file.read_text().splitlines()]


def test_a_batch_that_loses_the_prefix_stops_on_the_alarm_keeping_its_finished_lines(
    tmp_path: Path,
) -> None:
    batch_file = make_batch_file(tmp_path, ROWS)
    inputs = _ids(batch_file)
    settings = double_settings(tmp_path, stop_on_cache_miss=True)
    with in_thread_app(settings, LosingDouble(K)) as (url, _):
        client = client_for(url)
        b = create(client, batch_file.read_bytes())
        b = wait_batch(client, b.id, lambda x: x.status in ("failed", "completed"), 300)
        assert b.status == "failed", b.status
        error = (b.errors.data or [])[0] if b.errors else None
        assert error is not None and error.code == "reuse_alarm", b.errors
        assert "C000050..C000099" in (error.message or ""), error.message
        out, err = check_finished(client, b, inputs=inputs)
        # The window that holds row K raises the alarm when it closes (50 rows a window).
        assert 100 <= len(out) < ROWS, len(out)
        assert error_codes(err) == {"batch_failed": ROWS - len(out)}
        finished = [line["custom_id"] for line in out]
        assert sorted(finished) == sorted(inputs[: len(out)])


def test_without_the_option_the_batch_completes_and_the_service_prints_the_alarm(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    batch_file = make_batch_file(tmp_path, ROWS)
    with in_thread_app(double_settings(tmp_path), LosingDouble(K)) as (url, _):
        client = client_for(url)
        b = create(client, batch_file.read_bytes())
        b = wait_batch(client, b.id, lambda x: x.status in ("failed", "completed"), 300)
        assert b.status == "completed", b.errors
        out, err = check_finished(client, b, inputs=_ids(batch_file))
        assert len(out) == ROWS and not err
    alarms = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("REUSE ALARM")]
    assert alarms and alarms[0].startswith("REUSE ALARM: rows C000050..C000099 (50 requests)")
