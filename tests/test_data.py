"""coscale.train.data: tokenizer, embedded corpus, token files, split, entropy, resumable sampling."""

import math

import numpy as np
import pytest
import torch

from coscale.errors import DataError
from coscale.tokenizer import ByteTokenizer
from coscale.train.data import (
    BatchSampler,
    embedded_corpus_text,
    eval_batches,
    load_tokens,
    split_tokens,
    unigram_entropy,
)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "MLA compresses K and V – naïve ✓"
    ids = np.asarray(tok.encode(text))
    assert ids.max() < 256 and tok.vocab_size == 256
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids.astype(np.int64))) == text


def test_embedded_corpus_is_english_and_deterministic():
    text = embedded_corpus_text()
    assert len(text) > 100_000
    assert text == embedded_corpus_text()
    tokens = load_tokens(None, vocab_size=256)
    entropy = unigram_entropy(tokens, 256)
    # English bytes: about 4.4-4.8 bits per byte.
    assert 4.2 < entropy / math.log(2) < 5.0


def test_text_file_and_multiple_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("hello ")
    b.write_text("world")
    tokens = load_tokens([str(a), str(b)], vocab_size=256)
    assert bytes(tokens.tolist()) == b"hello world"


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_files(tmp_path, dtype):
    ids = np.array([0, 5, 300, 999, 1], dtype=dtype)
    path = tmp_path / "tokens.bin"
    ids.tofile(path)
    tokens = load_tokens([str(path)], vocab_size=1000, bin_dtype=dtype)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.dtype(dtype)
    assert tokens.tolist() == ids.tolist()


def test_bin_ids_out_of_range(tmp_path):
    path = tmp_path / "tokens.bin"
    np.array([1, 2, 70000], dtype=np.uint32).tofile(path)
    with pytest.raises(DataError, match="token id 70000, out of range for vocab_size 1000"):
        load_tokens([str(path)], vocab_size=1000, bin_dtype="uint32")


def test_bin_wrong_dtype_size(tmp_path):
    path = tmp_path / "tokens.bin"
    np.array([1, 2, 3], dtype=np.uint16).tofile(path)  # 6 bytes: not whole uint32 tokens
    with pytest.raises(DataError, match="--bin-dtype"):
        load_tokens([str(path)], vocab_size=1000, bin_dtype="uint32")


def test_text_needs_byte_vocab(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("~~~")  # byte 126
    with pytest.raises(DataError, match="vocab_size >= 256"):
        load_tokens([str(path)], vocab_size=100)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_tokens([str(tmp_path / "nope.txt")], vocab_size=256)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no tokens"):
        load_tokens([str(tmp_path / "empty.txt")], vocab_size=256)
    with pytest.raises(DataError, match="directory"):
        load_tokens([str(tmp_path)], vocab_size=256)


def test_corpus_shorter_than_seq_len():
    tokens = np.arange(100, dtype=np.uint8)
    with pytest.raises(DataError, match="too short for seq_len 64"):
        split_tokens(tokens, 0.1, seq_len=64)
    with pytest.raises(DataError, match="fewer than seq_len"):
        BatchSampler(tokens[:10], batch_size=2, seq_len=10, seed=0)


def test_split_is_deterministic_tail():
    tokens = np.arange(1000, dtype=np.uint16)
    split = split_tokens(tokens, 0.1, seq_len=16)
    assert split.train.size == 900 and split.val[0] == 900
    assert split_tokens(tokens, 0.01, seq_len=16).val.size == 17  # at least one window


def test_unigram_entropy():
    assert unigram_entropy(np.arange(256, dtype=np.uint8), 256) == pytest.approx(math.log(256))
    assert unigram_entropy(np.zeros(10, dtype=np.uint8), 256) == 0.0


def test_sampler_windows_and_resume():
    tokens = np.arange(500, dtype=np.uint16)
    sampler = BatchSampler(tokens, batch_size=4, seq_len=8, seed=3)
    x, y = sampler.next_batch()
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # labels are the next tokens
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(3)]
    fresh = BatchSampler(tokens, batch_size=4, seq_len=8, seed=99)
    fresh.load_state_dict(state)
    for (ex, ey), (gx, gy) in zip(expected, [fresh.next_batch() for _ in range(3)]):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)
    assert fresh.batches_drawn == 4


def test_sampler_reaches_the_last_window():
    tokens = np.arange(10, dtype=np.uint16)
    sampler = BatchSampler(tokens, batch_size=64, seq_len=9, seed=0)
    x, y = sampler.next_batch()  # only one window fits
    assert torch.equal(x[0], torch.arange(9)) and torch.equal(y[0], torch.arange(1, 10))


def test_eval_batches_fixed():
    tokens = np.arange(1000, dtype=np.uint16)
    a = eval_batches(tokens, batch_size=4, seq_len=16, max_batches=3)
    b = eval_batches(tokens, batch_size=4, seq_len=16, max_batches=3)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ya, xa + 1)
    assert int(a[-1][1].max()) == 999  # covers the end of the split
