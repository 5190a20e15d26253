"""Serve small deterministic text models on a real Triton Inference Server (via PyTriton).

Why: the triton plugin must be proven against Triton's own HTTP front end (KServe v2 metadata,
readiness, ``/generate`` and ``/generate_stream``), not only against our idea of it. This script
runs under the dedicated ``.venv-triton`` (``scripts/install-triton.sh``) as a subprocess of the
``triton_server`` fixture; it never imports the gateway and the gateway never imports PyTriton.

The models "generate" by echoing the prompt they receive word by word, so a test can predict the
exact output of a chat template and of ``max_tokens`` without a neural network:

- ``echo``: batched, non-decoupled (``/generate``); reports token counts and a finish reason.
- ``echo_stream``: decoupled (``/generate_stream``); one *delta* word per event, no counts.
- ``echo_cumulative``: decoupled; each event carries the *cumulative* text and token count, and
  the last one a finish reason.
- ``fail_stream``: decoupled; sends three words, then raises, so Triton reports an in-band
  ``data: {"error": ...}`` event under HTTP 200.
- ``spare``: like ``echo``; the test unloads it to see a configured model that is not ready.
- ``embed``: a batched *embedding* model (``max_batch_size`` ``EMBED_MAX_BATCH``) for KServe v2
  ``infer``: input ``TEXT`` (BYTES), outputs ``norm`` (FP32, listed first, so the plugin must be
  told which output is the vector) and ``VECTOR`` (FP32, ``EMBED_DIMS`` floats): a histogram of
  the text's UTF-8 bytes by ``byte % EMBED_DIMS``, each bucket plus one, scaled to unit length
  (``norm`` is the length before scaling).  It has no text output, so it cannot chat.

Run: ``python tests/real/triton_models.py --http-port P --grpc-port G --metrics-port M
[--token-file F] [--workspace DIR]``. SIGTERM and SIGINT stop Triton cleanly (PyTriton handles only SIGINT itself).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

# PyTriton lives in .venv-triton only (this script runs there); mypy runs in .venv.
from pytriton.decorators import batch  # type: ignore[import-not-found]
from pytriton.model_config import ModelConfig, Tensor  # type: ignore[import-not-found]
from pytriton.triton import Triton, TritonConfig  # type: ignore[import-not-found]

#: Words generated when a request gives no ``max_tokens`` (keeps replies short by default).
DEFAULT_MAX_TOKENS = 64
#: ``fail_stream`` raises after this many events.
FAIL_AFTER = 3
#: Floats per ``embed`` vector.
EMBED_DIMS = 8
#: The largest batch ``embed`` takes in one execution (Triton rejects larger requests).
EMBED_MAX_BATCH = 8


def _text(value: Any) -> str:
    """A BYTES tensor element (bytes or a numpy bytes scalar) as text."""
    return bytes(value).decode("utf-8")


def _limit(inputs: Any, index: int = 0) -> int:
    """``max_tokens`` of one request (an optional INT32 input), or the default.

    ``inputs`` is a dict under ``@batch`` and a PyTriton ``Request`` (mapping-like, no ``get``)
    in a decoupled model.
    """
    if "max_tokens" not in inputs.keys():  # noqa: SIM118 (Request has keys(), not __contains__)
        return DEFAULT_MAX_TOKENS
    return int(np.asarray(inputs["max_tokens"]).reshape(-1)[index])


def _generate(prompt: str, limit: int) -> tuple[list[str], str]:
    """The "generated" tokens (the prompt's words, each but the first with a leading space)."""
    words = prompt.split()
    tokens = [w if i == 0 else f" {w}" for i, w in enumerate(words[:limit])]
    return tokens, "length" if len(words) > limit else "stop"


@batch  # type: ignore[untyped-decorator]
def echo(text_input: np.ndarray, **optional: np.ndarray) -> dict[str, np.ndarray]:
    """Batched echo: whole reply at once, with token counts and the finish reason."""
    texts, prompt_counts, output_counts, reasons = [], [], [], []
    for i, row in enumerate(text_input):
        prompt = _text(row[0])
        tokens, reason = _generate(prompt, _limit(optional, i))
        texts.append(["".join(tokens).encode()])
        prompt_counts.append([len(prompt.split())])
        output_counts.append([len(tokens)])
        reasons.append([reason.encode()])
    return {
        "text_output": np.array(texts, dtype=object),
        "num_input_tokens": np.array(prompt_counts, dtype=np.int32),
        "num_output_tokens": np.array(output_counts, dtype=np.int32),
        "finish_reason": np.array(reasons, dtype=object),
    }


def echo_stream(requests: list[dict[str, np.ndarray]]) -> Iterator[list[dict[str, np.ndarray]]]:
    """Decoupled echo: one delta word per response (no counts, no finish reason)."""
    request = requests[0]
    tokens, _ = _generate(_text(request["text_input"][0]), _limit(request))
    for token in tokens:
        yield [{"text_output": np.array([token.encode()], dtype=object)}]


def echo_cumulative(
    requests: list[dict[str, np.ndarray]],
) -> Iterator[list[dict[str, np.ndarray]]]:
    """Decoupled echo sending the text so far, a running token count and a final reason."""
    request = requests[0]
    tokens, reason = _generate(_text(request["text_input"][0]), _limit(request))
    for i in range(1, len(tokens) + 1):
        yield [
            {
                "text_output": np.array(["".join(tokens[:i]).encode()], dtype=object),
                "num_output_tokens": np.array([i], dtype=np.int32),
                "finish_reason": np.array(
                    [reason.encode() if i == len(tokens) else b""], dtype=object
                ),
            }
        ]


def fail_stream(requests: list[dict[str, np.ndarray]]) -> Iterator[list[dict[str, np.ndarray]]]:
    """Decoupled model that fails mid-stream (after ``FAIL_AFTER`` words)."""
    request = requests[0]
    tokens, _ = _generate(_text(request["text_input"][0]), DEFAULT_MAX_TOKENS)
    for token in tokens[:FAIL_AFTER]:
        yield [{"text_output": np.array([token.encode()], dtype=object)}]
    raise RuntimeError("fail_stream: simulated failure inside the model")


def _histogram(text: str) -> np.ndarray:
    """``embed``'s vector before scaling: one plus the count of UTF-8 bytes ``b`` per bucket
    ``b % EMBED_DIMS`` (never all zero, so the empty string has a direction too)."""
    counts = np.ones(EMBED_DIMS, dtype=np.float64)
    for byte in text.encode("utf-8"):
        counts[byte % EMBED_DIMS] += 1.0
    return counts


@batch  # type: ignore[untyped-decorator]
def embed(**inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Batched embedding: one unit-length ``VECTOR`` and its pre-scaling ``norm`` per row."""
    vectors, norms = [], []
    for row in inputs["TEXT"]:
        counts = _histogram(_text(row[0]))
        norm = float(np.linalg.norm(counts))
        vectors.append(counts / norm)
        norms.append([norm])
    return {
        "norm": np.array(norms, dtype=np.float32),
        "VECTOR": np.array(vectors, dtype=np.float32),
    }


def _text_inputs() -> list[Tensor]:
    return [
        Tensor(name="text_input", dtype=bytes, shape=(1,)),
        Tensor(name="max_tokens", dtype=np.int32, shape=(1,), optional=True),
    ]


def _stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, which ``Triton.serve`` handles by stopping cleanly."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--token-file", type=Path, help="write the repository access token here")
    parser.add_argument(
        "--workspace", type=Path, help="PyTriton's working folder (default: under ~/.cache)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _stop_on_sigterm()

    config = TritonConfig(
        http_address="127.0.0.1",
        grpc_address="127.0.0.1",
        metrics_address="127.0.0.1",
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        exit_timeout_secs=5,
    )
    decoupled = ModelConfig(batching=False, decoupled=True)
    with Triton(config=config, workspace=args.workspace) as triton:
        if args.token_file is not None:
            args.token_file.write_text(triton.get_access_token())
        counts = [
            Tensor(name="num_input_tokens", dtype=np.int32, shape=(1,)),
            Tensor(name="num_output_tokens", dtype=np.int32, shape=(1,)),
            Tensor(name="finish_reason", dtype=bytes, shape=(1,)),
        ]
        for name in ("echo", "spare"):
            triton.bind(
                model_name=name,
                infer_func=echo,
                inputs=[
                    *_text_inputs(),
                    Tensor(name="temperature", dtype=np.float32, shape=(1,), optional=True),
                ],
                outputs=[Tensor(name="text_output", dtype=bytes, shape=(1,)), *counts],
                config=ModelConfig(max_batch_size=8),
            )
        triton.bind(
            model_name="echo_stream",
            infer_func=echo_stream,
            inputs=_text_inputs(),
            outputs=[Tensor(name="text_output", dtype=bytes, shape=(1,))],
            config=decoupled,
        )
        triton.bind(
            model_name="echo_cumulative",
            infer_func=echo_cumulative,
            inputs=_text_inputs(),
            outputs=[
                Tensor(name="text_output", dtype=bytes, shape=(1,)),
                Tensor(name="num_output_tokens", dtype=np.int32, shape=(1,)),
                Tensor(name="finish_reason", dtype=bytes, shape=(1,)),
            ],
            config=decoupled,
        )
        triton.bind(
            model_name="embed",
            infer_func=embed,
            inputs=[Tensor(name="TEXT", dtype=bytes, shape=(1,))],
            outputs=[
                Tensor(name="norm", dtype=np.float32, shape=(1,)),
                Tensor(name="VECTOR", dtype=np.float32, shape=(EMBED_DIMS,)),
            ],
            config=ModelConfig(max_batch_size=EMBED_MAX_BATCH),
        )
        triton.bind(
            model_name="fail_stream",
            infer_func=fail_stream,
            inputs=[Tensor(name="text_input", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="text_output", dtype=bytes, shape=(1,))],
            config=decoupled,
        )
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
