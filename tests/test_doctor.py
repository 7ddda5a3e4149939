"""`harness doctor` against the embedded default, against nothing, and against a replayed Ollama
whose loaded context is Ollama's default 4,096 tokens (tests/ollama_replay.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ollama_replay import OllamaReplay

pytestmark = pytest.mark.integration


def doctor(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness", "doctor", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_doctor_on_the_embedded_default_is_all_ok(tmp_path: Path) -> None:
    done = doctor("--model", "tiny-gemma3", "--ctx", "8192", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(ln.startswith("ok    server: embedded at http://127.0.0.1:") for ln in lines)
    assert any(ln.startswith("ok    context: prompt tokens: rubric") for ln in lines)
    assert any(ln.startswith("ok    cached tokens: the server reports them") for ln in lines)
    assert any(ln.startswith("note  gpu: the embedded server runs on the CPU") for ln in lines)
    assert any(ln.startswith("ok    disk:") for ln in lines)
    assert lines[-1] == "doctor: all ok"


def test_doctor_against_nothing_names_the_url(tmp_path: Path) -> None:
    done = doctor("--backend", "openai", "--base-url", "http://127.0.0.1:1", cwd=tmp_path)
    assert done.returncode == 1
    assert "FAIL  server: cannot connect to http://127.0.0.1:1" in done.stdout
    assert "doctor: 1 of" in done.stdout


def test_doctor_against_ollama_default_context_names_num_ctx(tmp_path: Path) -> None:
    with OllamaReplay(
        context_length=4096,
        counts=lambda body: {"prompt_eval_count": None, "prompt_eval_cached_count": None},
    ) as replay:
        done = doctor("--backend", "ollama", "--base-url", replay.url, cwd=tmp_path)
    assert done.returncode == 1, done.stdout
    context = next(ln for ln in done.stdout.splitlines() if "context:" in ln)
    assert context.startswith("FAIL  context:")
    assert "one request's context is 4096 (ollama:/api/ps context_length)" in context
    assert "num_ctx" in context and "OLLAMA_CONTEXT_LENGTH" in context
    cached = next(ln for ln in done.stdout.splitlines() if "cached tokens:" in ln)
    assert cached.startswith("FAIL") and "prompt_eval_cached_count" in cached
    # The doctor states the evidence it has of which Ollama sends the field (issue 26).
    assert "ollama PR #17943" in cached and "No recorded reply of a named release" in cached
