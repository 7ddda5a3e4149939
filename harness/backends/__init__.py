"""Model server backends behind one contract: embedded llama.cpp, OpenAI-compatible, Ollama.

`base` is the contract and imports no backend; importing this package registers the built-in
ones (`Backend.create("embedded" | "openai" | "ollama", ...)`) and `pool` (several servers of
one model as one backend: `Backend.create("pool", members=[...])`); `http` is the one error
edge of the HTTP backends.
"""

from harness.backends import embedded, ollama, openai, pool  # registration (@Backend.register)
from harness.backends.base import Backend, ChatRequest, ChatResult, ServerInfo, Timings, Usage

__all__ = ["Backend", "ChatRequest", "ChatResult", "ServerInfo", "Timings", "Usage"]
del embedded, ollama, openai, pool
