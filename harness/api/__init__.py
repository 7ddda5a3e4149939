"""`harness api`: OpenAI's Files and Batches API served over the harness engine.

Any tool that speaks OpenAI's Batch API (the official `openai` client first) can run batch jobs
on a local model: upload a JSONL of requests, create a batch, poll it, download the output.

Modules, one concern each:

- `cli`: the `harness api` command line (`main`: the data dir's lock first) and `serve`
  (uvicorn on a bound socket);
- `settings`: `ApiSettings`, checked before anything starts (a non-loopback host needs a key);
- `app`: the FastAPI routes, the body-limit ASGI layer, OpenAI's error shape (a full disk: 507);
- `guards`: who may call: the Host and Origin check, the key (Bearer; HTTP Basic for the page),
  JSON routes' Content-Type;
- `service`: what the routes do: files (quotas), batches, the pass-through to the model server;
- `uploads`: a multipart upload parsed as it streams, straight into the data dir;
- `runner`: `BatchWorker`, validating batches and running them one at a time on `run_job`
  (after `harness run`'s prompt-length check), finalizing them into output and error files,
  resuming after a restart;
- `servers`: the model-server processes the service starts, noted so that a restart after a
  SIGKILL stops them, and started without the service's secrets in their environment;
- `validate`: input lines streamed and checked as OpenAI checks them, errors by line number
  (the model a line names must be the one served);
- `store`: the SQLite state and the file blobs; `schemas`: OpenAI's objects, field for field;
- `page` (the batches page at `/`) and `metrics` (`/metrics`, Prometheus text).
"""

from typing import TYPE_CHECKING

from harness.api.cli import main, serve
from harness.api.settings import ApiSettings

if TYPE_CHECKING:
    from harness.api.app import create_app

__all__ = ["ApiSettings", "create_app", "main", "serve"]


def __getattr__(name: str) -> object:
    # The app pulls in FastAPI; importing the package for `main` should not.
    if name == "create_app":
        from harness.api.app import create_app

        return create_app
    raise AttributeError(f"module 'harness.api' has no attribute {name!r}")
