"""`harness run`'s banner, byte for byte: the same inputs print the same lines.

The banner is what a user reads before a long run (every setting and where it came from), and
what the suites' and the README's examples quote. These cases run `harness run` in-process on
real servers (tiny-gemma3 on the embedded llama.cpp server; Ollama replayed from recorded
bodies, tests/ollama_replay.py) and compare every `harness run: ...` line it printed on stderr
with the files in tests/data/banner/, written from the code before the run pipeline was
refactored (issue 28).

What varies from one run to the next, and nothing else, is normalised before comparing:

- `127.0.0.1:<port>` is `127.0.0.1:PORT` (every server listens on a free port);
- `llama.cpp <build>` is `llama.cpp BUILD` (the installed xllamacpp wheel's build, not ours);
- the repository's root is `ROOT`, the test's folder `TMP` and the model cache
  (`harness.models.tiny.cache_dir()`) `CACHE` (paths of this checkout and user);
- `os.cpu_count()` answers 2 (the threads line of several servers shares the machine's cores).

An intended change of the banner rewrites the files with `HARNESS_UPDATE_BANNERS=1 pytest
tests/test_run_banner.py`; the diff of tests/data/banner/ is then the change, for review.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from ollama_replay import OllamaReplay, counting

from harness.backends.embedded import EmbeddedServer
from harness.cli import main
from harness.models.tiny import cache_dir
from harness.workload import write_candidates_csv

pytestmark = [pytest.mark.integration]
ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "data" / "banner"
UPDATE = os.environ.get("HARNESS_UPDATE_BANNERS") == "1"
THREADS = ("--threads", "1")
"""One server thread: llama.cpp's default spin-waits on a 2-core machine shared with others."""
Run = Callable[..., str]

CONFIG = """\
profiles:
  embedded:
    n_ctx: 4608
    STRATEGY: conversation
    TRIM_INTERVAL: 40
    SERVER_FLAGS: harness
    MAX_CONTEXT_TOKENS: 4096
    provenance:
      n_ctx: {report: reports/context_limit_results.embedded.tiny-gemma3.json,
              backend: embedded, model: tiny-gemma3}
      MAX_CONTEXT_TOKENS: {report: reports/context_limit_results.json, backend: ollama}
"""


def normalised(stderr: str, tmp: Path) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("harness run: ")]
    text = "\n".join(lines) + "\n"
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)
    text = re.sub(r"llama\.cpp [^\s,;)]+", "llama.cpp BUILD", text)
    for path, name in (
        (tmp.resolve(), "TMP"),
        (tmp, "TMP"),
        (cache_dir(), "CACHE"),
        (ROOT, "ROOT"),
    ):
        text = text.replace(str(path), name)
    return text


def check(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"the banner of `harness run` changed ({path}):\n{text}"


@pytest.fixture
def run_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Run:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    write_candidates_csv("c.csv", 3, seed=2)

    def run(*argv: str, code: int = 0) -> str:
        capsys.readouterr()
        assert main(["run", *argv, "--no-progress"]) == code
        return normalised(capsys.readouterr().err, tmp_path)

    return run


def test_banner_of_the_embedded_default(run_here: Run) -> None:
    run = run_here
    text = run("c.csv", "--model", "tiny-gemma3", *THREADS, "--structured", "none",
               "--max-tokens", "4")  # fmt: skip
    check("embedded_default", text)


def test_banner_of_a_pool_with_measured_settings(run_here: Run) -> None:
    """harness.yaml's values (one measured on another backend: not applied), two servers."""
    run = run_here
    Path("harness.yaml").write_text(CONFIG, encoding="utf-8")
    text = run("c.csv", "--model", "tiny-gemma3", "--servers", "2", "--concurrency", "2",
               "--structured", "none", "--max-tokens", "4")  # fmt: skip
    check("embedded_pool_measured", text)


def test_banner_of_a_batch_file_on_the_chat_path_in_logprobs_mode(run_here: Run) -> None:
    run = run_here
    assert main(["convert", "c.csv", "b.jsonl", "--seed", "5"]) == 0
    text = run("b.jsonl", "--model", "tiny-gemma3", *THREADS, "--request-path", "chat",
               "--score-mode", "logprobs", "--ctx", "4096", "--concurrency", "2",
               "--profile", "other", "--config", "other.yaml")  # fmt: skip
    check("embedded_batch_chat_logprobs", text)


def test_banner_of_an_openai_server(run_here: Run, tiny_server: EmbeddedServer) -> None:
    run = run_here
    assert tiny_server.url is not None
    text = run("c.csv", "--backend", "openai", "--base-url", f"{tiny_server.url}/v1",
               "--structured", "none", "--max-tokens", "4", "--strategy", "stateless")  # fmt: skip
    check("openai", text)


def test_banner_of_ollama(run_here: Run, tiny_server: EmbeddedServer) -> None:
    """Ollama replayed from recorded bodies: the context read from /api/ps, the packaged
    tokenizer counting."""
    run = run_here
    assert tiny_server.url is not None
    with OllamaReplay(version="0.34.0", counts=counting(tiny_server.url)) as replay:
        text = run("c.csv", "--backend", "ollama", "--base-url", replay.url,
                   "--model", "gemma3:12b", "--structured", "none")  # fmt: skip
    check("ollama", text)
