"""Training data: a byte tokenizer, the embedded corpus, token files and a resumable batch sampler.

Nothing here downloads anything. With no data path the corpus is the English documentation that
every CPython carries in ``pydoc_data.topics`` (about 0.47 MB, the text behind ``help('if')``); when a
Python build lacks it, the docstrings of standard-library modules stand in.

Tokens are bytes (ids 0..255), which is why the ``tiny`` preset has a vocabulary of 256. Larger
vocabularies come from pre-tokenised ``.bin`` files: a flat, header-free array of token ids in
``uint16`` (the default, vocabularies up to 65536) or ``uint32``, read through ``np.memmap`` so that a
corpus larger than memory works.

The train/validation split is deterministic: the last ``val_fraction`` of the tokens are held out.
Training batches are random windows drawn with a seeded ``torch.Generator`` whose state goes into
training checkpoints, so a resumed run draws exactly the batches an uninterrupted run would have.
Validation batches are fixed, evenly spaced windows of the held-out split.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from coscale.errors import DataError
from coscale.tokenizer import ByteTokenizer, Tokenizer, encode_text, load_tokenizer

BIN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
EMBEDDED_CORPUS = "embedded"  # display name of the built-in corpus


# ---- sources -------------------------------------------------------------------------------------


def embedded_corpus_text() -> str:
    """The built-in English corpus: CPython's pydoc topics, in a fixed shuffled order.

    Topics are shuffled with a fixed seed (not left alphabetical) so that the held-out tail of the
    corpus is a mix of subjects, not only the topics late in the alphabet.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return _stdlib_docstrings()
    keys = sorted(topics)
    random.Random(0).shuffle(keys)
    return "\n\n".join(topics[k] for k in keys)


def _stdlib_docstrings() -> str:
    import importlib

    names = ["argparse", "collections", "json", "os", "pathlib", "re", "string", "textwrap",
             "typing", "unittest", "functools", "itertools", "dataclasses", "logging", "email"]
    parts: list[str] = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for obj in [module, *vars(module).values()]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200:
                parts.append(doc)
    return "\n\n".join(dict.fromkeys(parts))


def load_tokens(
    paths: Sequence[str | os.PathLike] | None,
    vocab_size: int,
    bin_dtype: str = "uint16",
    tokenizer: str | None = None,
) -> np.ndarray:
    """All training tokens as one 1-D array (a memmap for a single ``.bin`` file).

    ``paths`` None or empty means the embedded corpus. Text files are tokenized with ``tokenizer``
    (a tokenizer.json or a directory holding one, see :mod:`coscale.tokenizer`; None or "bytes": UTF-8
    bytes); ``.bin`` files are read as header-free ``bin_dtype`` arrays (``coscale tokenize`` writes them).
    Every id must be below ``vocab_size``.
    """
    if bin_dtype not in BIN_DTYPES:
        raise DataError(f"bin dtype must be one of {', '.join(BIN_DTYPES)}, got {bin_dtype!r}")
    text_tokenizer = load_tokenizer(tokenizer)
    if not isinstance(text_tokenizer, ByteTokenizer) and text_tokenizer.vocab_size > vocab_size:
        raise DataError(f"the tokenizer {text_tokenizer.name} has {text_tokenizer.vocab_size} ids but the model's "
                        f"vocabulary has {vocab_size}: pick a model config whose vocab_size fits it")
    if not paths:
        arrays = [_encode(text_tokenizer, embedded_corpus_text())]
        names = [EMBEDDED_CORPUS]
    else:
        names = [os.fspath(p) for p in paths]
        arrays = [_read_file(p, bin_dtype, text_tokenizer) for p in names]
    for name, arr in zip(names, arrays):
        _check_ids(name, arr, vocab_size)
    if len(arrays) == 1:
        return arrays[0]
    dtype = np.result_type(*[a.dtype for a in arrays])
    return np.concatenate([np.asarray(a, dtype=dtype) for a in arrays])


def _read_file(path: str, bin_dtype: str, tokenizer: Tokenizer) -> np.ndarray:
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"data path is a directory, expected a text or .bin file: {path}")
    if path.endswith(".bin"):
        itemsize = np.dtype(BIN_DTYPES[bin_dtype]).itemsize
        size = os.path.getsize(path)
        if size == 0 or size % itemsize:
            raise DataError(
                f"{path}: {size} bytes is not a whole number of {bin_dtype} tokens; "
                "check --bin-dtype"
            )
        return np.memmap(path, dtype=BIN_DTYPES[bin_dtype], mode="r")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(raw, dtype=np.uint8).copy()  # any bytes, UTF-8 or not
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); the tokenizer {tokenizer.name} reads "
                        "text") from None
    return _encode(tokenizer, text)


def _encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Ids of ``text``; bytes stay uint8 (one byte per token, and the data fingerprints runs recorded)."""
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()
    return encode_text(tokenizer, text)


def _check_ids(name: str, tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.size == 0:
        raise DataError(f"{name} holds no tokens")
    top = _max_in_chunks(tokens)
    if top >= vocab_size:
        hint = " (a text file is tokenised as bytes: use a model with vocab_size >= 256)" \
            if tokens.dtype == np.uint8 else "; check --bin-dtype or the model's vocab_size"
        raise DataError(f"{name} holds token id {top}, out of range for vocab_size {vocab_size}{hint}")


def _max_in_chunks(tokens: np.ndarray, chunk: int = 1 << 24) -> int:
    """The largest id, read in chunks so that a memmap larger than memory is never fully loaded."""
    return max(int(tokens[i : i + chunk].max()) for i in range(0, tokens.size, chunk))


# ---- split and statistics ------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    val: np.ndarray


def split_tokens(tokens: np.ndarray, val_fraction: float, seq_len: int) -> Split:
    """The first ``1 - val_fraction`` of the tokens train, the rest validate.

    Both parts must hold at least one window of ``seq_len + 1`` tokens (inputs plus shifted labels).
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    need = seq_len + 1
    n = int(tokens.size)
    n_val = max(need, int(n * val_fraction))
    if n - n_val < need:
        raise DataError(
            f"the corpus has {n} tokens: too short for seq_len {seq_len} with a held-out split "
            f"(needs at least {2 * need}); use a larger corpus or a smaller --seq-len"
        )
    return Split(train=tokens[: n - n_val], val=tokens[n - n_val :])


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy of the token frequencies, in nats per token: the loss of the best context-free model.

    A language model whose loss is clearly below this number has learnt to use context.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    chunk = 1 << 24
    for i in range(0, tokens.size, chunk):
        counts += np.bincount(np.asarray(tokens[i : i + chunk]), minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nats_to_bits(nats: float) -> float:
    return nats / math.log(2)


# ---- batches -------------------------------------------------------------------------------------


def _windows(tokens: np.ndarray, starts: Sequence[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), both [B, S] int64; labels[b, t] = tokens[start + t + 1]."""
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    window = torch.from_numpy(rows)  # (B, S + 1)
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens; its generator state makes a run resumable."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        if tokens.size < seq_len + 1:
            raise DataError(
                f"the training split has {tokens.size} tokens, fewer than seq_len + 1 = {seq_len + 1}"
            )
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        high = self.tokens.size - self.seq_len  # last valid start + 1
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator)
        self.batches_drawn += 1
        return _windows(self.tokens, starts.tolist(), self.seq_len)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation batches: up to ``max_batches * batch_size`` evenly spaced windows."""
    n_windows = min(max_batches * batch_size, max(1, (tokens.size - 1) // seq_len))
    last_start = tokens.size - seq_len - 1
    starts = np.linspace(0, last_start, n_windows).astype(np.int64).tolist()
    return [
        _windows(tokens, starts[i : i + batch_size], seq_len)
        for i in range(0, len(starts), batch_size)
    ]


def data_fingerprint(paths: Sequence[str | os.PathLike] | None, tokens: np.ndarray) -> dict:
    """What identifies a corpus in a checkpoint: its sources and its token count."""
    sources = [os.path.abspath(os.fspath(p)) for p in paths] if paths else [EMBEDDED_CORPUS]
    return {"sources": sources, "num_tokens": int(tokens.size)}
