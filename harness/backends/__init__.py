"""Model server backends behind one contract: embedded llama.cpp, OpenAI-compatible, Ollama."""

from harness.backends.base import Backend, ChatRequest, ChatResult, ServerInfo, Timings, Usage

__all__ = ["Backend", "ChatRequest", "ChatResult", "ServerInfo", "Timings", "Usage"]
