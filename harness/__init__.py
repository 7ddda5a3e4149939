"""llm-batch-harness: validate a large local LLM batch job phase by phase, then run it."""

__version__ = "0.1.0"
