"""Tests against real upstream servers (llama.cpp via llama-cpp-python)."""
