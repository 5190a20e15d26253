"""inference-server: one OpenAI-compatible API in front of many model servers."""

__version__ = "0.1.0"
