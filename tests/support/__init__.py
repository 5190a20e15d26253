"""Helpers shared by the test suites: a tiny GGUF model and process management."""
