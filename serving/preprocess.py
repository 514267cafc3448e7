"""Inputs -> model tensors, the one place each preprocessing rule lives.

Shared by the server, the batch CLI, training (the text encoders) and the tests, so a request is
prepared exactly as the training data was. Every function raises ``InputError`` with a message that
says what was wrong and what is expected; callers map it to ``INVALID_ARGUMENT`` or an error row.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import numpy as np


class InputError(ValueError):
    """The input cannot be turned into a tensor; the message is safe to show to the client."""


class InputTooLarge(InputError):
    """The input exceeds a configured size limit (maps to RESOURCE_EXHAUSTED)."""


# --- Text: names (lecture 13) and hello (lecture 12) -----------------------------------------------

MAX_TEXT_LENGTH = 256


def _ascii_name(text: str, vocab_size: int) -> str:
    name = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii") if text else ""
    if not name.strip():
        raise InputError(f"empty name {text!r}: expected a non-empty name in Latin letters")
    if len(name) > MAX_TEXT_LENGTH:
        raise InputError(f"name of {len(name)} characters: at most {MAX_TEXT_LENGTH} are accepted")
    if any(ord(c) >= vocab_size or ord(c) == 0 for c in name):
        raise InputError(f"name {text!r} has characters outside ASCII 1..{vocab_size - 1}")
    return name


def encode_names(texts: Sequence[str], vocab_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Names -> (chars int64 [N, T] of code points, 0-padded; lengths int64 [N]).

    Names are NFKD-normalized and accents dropped ("Müller" -> "Muller"), as the course data is ASCII.
    """
    if not texts:
        raise InputError("no names given: expected at least one")
    names = [_ascii_name(t, vocab_size) for t in texts]
    lengths = np.array([len(n) for n in names], dtype=np.int64)
    chars = np.zeros((len(names), int(lengths.max())), dtype=np.int64)
    for i, n in enumerate(names):
        chars[i, : len(n)] = np.frombuffer(n.encode("ascii"), dtype=np.uint8)
    return chars, lengths


def encode_hello(texts: Sequence[str], vocabulary: Sequence[str]) -> np.ndarray:
    """Texts over the vocabulary -> int64 [N, T] indices, right-padded with index 0.

    The hello models are causal (output t depends on inputs <= t), so padding at the end leaves each
    text's own outputs unchanged; ``decode_hello`` cuts them back to each text's length.
    """
    if not texts:
        raise InputError("no texts given: expected at least one")
    index = {c: i for i, c in enumerate(vocabulary)}
    allowed = "".join(vocabulary)
    rows = []
    for t in texts:
        if not t:
            raise InputError(f"empty text: expected a word over the letters {allowed!r}")
        if len(t) > MAX_TEXT_LENGTH:
            raise InputError(f"text of {len(t)} characters: at most {MAX_TEXT_LENGTH} are accepted")
        bad = sorted({c for c in t if c not in index})
        if bad:
            raise InputError(f"text {t!r} has letters {''.join(bad)!r}; only {allowed!r} are known")
        rows.append([index[c] for c in t])
    out = np.zeros((len(rows), max(map(len, rows))), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def decode_hello(logits: np.ndarray, texts: Sequence[str], vocabulary: Sequence[str]) -> list[str]:
    """Per-step argmax back to characters, each cut to its input's length."""
    idx = logits.argmax(axis=-1)
    return ["".join(vocabulary[j] for j in idx[i, : len(t)]) for i, t in enumerate(texts)]


# --- Records: diabetes (lectures 7-8) --------------------------------------------------------------

def encode_features(records: Sequence[Sequence[float]], num_features: int) -> np.ndarray:
    """Feature rows -> float32 [N, num_features]; wrong counts, NaN and infinities are refused."""
    if not records:
        raise InputError("no records given: expected at least one")
    for i, r in enumerate(records):
        if len(r) != num_features:
            raise InputError(f"record {i} has {len(r)} features: expected {num_features}")
    x = np.asarray(records, dtype=np.float32).reshape(len(records), num_features)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise InputError(f"record {int(bad[0])} has NaN or infinite values: expected finite numbers")
    return x
