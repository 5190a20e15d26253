"""Write a tiny, random-weight llama GGUF model for tests against a real llama.cpp server.

Why this exists: the tests need a *real* OpenAI-compatible upstream (llama.cpp via
``llama_cpp.server``), but no model can be downloaded here or in CI. A llama
architecture with random weights and a byte-level SentencePiece ("llama") vocabulary
is enough for llama.cpp to load it, apply a chat template, tokenize the prompt, sample
tokens and report real usage counts. The file is ~0.5 MB, loads in well under a
second and answers in tens of milliseconds. Its output is gibberish, and because it
practically never samples EOS, callers must always set ``max_tokens``.

The file is deterministic: a fixed NumPy seed and a fixed vocabulary give the same
bytes on every run, so failures are reproducible.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGUFWriter, TokenType

#: Shape of the model; tests may rely on these.
N_LAYERS = 2
N_EMBD = 64
N_HEAD = 4
N_FF = 128
CONTEXT_LENGTH = 512
SEED = 20240607

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"

#: ChatML-style template. llama-cpp-python renders it with jinja2 and then
#: tokenizes the result with ``<|im_start|>``/``<|im_end|>`` as control tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: Control tokens after the three SentencePiece specials. Every token string must be
#: unique, or llama.cpp aborts while building its token-to-id map.
_EXTRA_CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>")

#: A few word pieces so that common text tokenizes to fewer tokens than bytes and
#: the gibberish contains some words. "▁" (U+2581) marks a leading space in SPM.
_WORD_PIECES = (
    "▁",
    "▁the",
    "▁a",
    "▁of",
    "▁and",
    "▁to",
    "▁is",
    "▁Paris",
    "▁France",
    "▁capital",
    "▁hello",
    "▁world",
    "user",
    "assistant",
    "system",
)


#: Per-class weight on the constant "bias" embedding dimension (see
#: ``write_tiny_llama_gguf``): it steers sampling towards readable pieces and makes
#: control tokens (EOS included) practically impossible, so every completion runs to
#: ``max_tokens`` and ends with ``finish_reason == "length"``.
_BIAS_WORD = 1.0
_BIAS_PRINTABLE_BYTE = 0.75
_BIAS_OTHER = -1.0


def _vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Return (tokens, scores, token types) of the byte-level SPM vocabulary.

    Layout: ``<unk>`` (0), ``<s>`` (1), ``</s>`` (2), the ChatML control tokens, the
    256 ``<0xNN>`` byte-fallback tokens (so any input can be tokenized), then the
    word pieces and their prefixes with decreasing scores.
    """
    tokens: list[str] = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN]
    types: list[int] = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    scores: list[float] = [0.0, 0.0, 0.0]

    for control in _EXTRA_CONTROL_TOKENS:
        tokens.append(control)
        types.append(TokenType.CONTROL)
        scores.append(0.0)

    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        types.append(TokenType.BYTE)
        scores.append(0.0)

    # SPM merges adjacent symbols only into pieces that exist, so a word piece is
    # reachable from its characters only if its prefixes are pieces too.
    pieces = dict.fromkeys(
        piece[:end] for piece in _WORD_PIECES for end in range(min(2, len(piece)), len(piece) + 1)
    )
    for rank, piece in enumerate(pieces):
        tokens.append(piece)
        types.append(TokenType.NORMAL)
        scores.append(-float(rank + 1))

    if len(set(tokens)) != len(tokens):  # pragma: no cover - guards future edits
        raise ValueError("duplicate token strings would make llama.cpp abort")
    return tokens, scores, types


def _logit_bias(token: str, kind: int) -> float:
    """Return the weight on the constant embedding dimension for one output token."""
    if kind == TokenType.NORMAL:
        return _BIAS_WORD
    if kind == TokenType.BYTE and 0x20 <= int(token[3:5], 16) <= 0x7E:
        return _BIAS_PRINTABLE_BYTE
    return _BIAS_OTHER


def write_tiny_llama_gguf(path: Path) -> None:
    """Write the tiny deterministic llama model to ``path`` (overwriting it).

    Weights are F32 drawn from a seeded normal distribution (std 0.02); norms are
    ones. Embedding dimension 0 is a constant 1.0 for every token, which dominates the
    residual stream after RMS norm (~8 after normalisation), so ``output.weight[:, 0]``
    acts as a per-token logit bias: word pieces get ~+8, printable ASCII bytes ~+6,
    everything else (controls, EOS, non-ASCII bytes that would form invalid UTF-8)
    ~-8. NumPy shapes are the reverse of GGML's ``ne`` order, e.g. ``token_embd`` is
    ``(n_vocab, n_embd)``.
    """
    tokens, scores, types = _vocabulary()
    n_vocab = len(tokens)
    rng = np.random.default_rng(SEED)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    token_embd = weight(n_vocab, N_EMBD)
    token_embd[:, 0] = 1.0
    output = weight(n_vocab, N_EMBD)
    output[:, 0] = [_logit_bias(token, kind) for token, kind in zip(tokens, types, strict=True)]

    writer = GGUFWriter(path, "llama")
    try:
        writer.add_name("inference-server tiny test model")
        writer.add_context_length(CONTEXT_LENGTH)
        writer.add_embedding_length(N_EMBD)
        writer.add_block_count(N_LAYERS)
        writer.add_feed_forward_length(N_FF)
        writer.add_head_count(N_HEAD)
        writer.add_head_count_kv(N_HEAD)
        writer.add_rope_dimension_count(N_EMBD // N_HEAD)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(n_vocab)
        writer.add_file_type(0)  # ALL_F32

        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(tokens.index(BOS_TOKEN))
        writer.add_eos_token_id(tokens.index(EOS_TOKEN))
        writer.add_unk_token_id(tokens.index(UNK_TOKEN))
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        # No implicit leading space: llama.cpp would otherwise insert "▁" after every
        # ChatML control token (e.g. "<|im_start|>▁user").
        writer.add_add_space_prefix(False)
        writer.add_chat_template(CHAT_TEMPLATE)
        # A pooling type makes /v1/embeddings (server started with --embedding true) answer
        # one flat vector per input, as OpenAI does; without it llama.cpp returns one per token.
        writer.add_pooling_type(gguf.PoolingType.MEAN)

        writer.add_tensor("token_embd.weight", token_embd)
        for block in range(N_LAYERS):
            prefix = f"blk.{block}"
            writer.add_tensor(f"{prefix}.attn_norm.weight", ones(N_EMBD))
            writer.add_tensor(f"{prefix}.attn_q.weight", weight(N_EMBD, N_EMBD))
            writer.add_tensor(f"{prefix}.attn_k.weight", weight(N_EMBD, N_EMBD))
            writer.add_tensor(f"{prefix}.attn_v.weight", weight(N_EMBD, N_EMBD))
            writer.add_tensor(f"{prefix}.attn_output.weight", weight(N_EMBD, N_EMBD))
            writer.add_tensor(f"{prefix}.ffn_norm.weight", ones(N_EMBD))
            writer.add_tensor(f"{prefix}.ffn_gate.weight", weight(N_FF, N_EMBD))
            writer.add_tensor(f"{prefix}.ffn_up.weight", weight(N_FF, N_EMBD))
            writer.add_tensor(f"{prefix}.ffn_down.weight", weight(N_EMBD, N_FF))
        writer.add_tensor("output_norm.weight", ones(N_EMBD))
        writer.add_tensor("output.weight", output)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
