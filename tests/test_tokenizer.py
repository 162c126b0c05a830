"""coscale.tokenizer: tokenizer.json through `tokenizers`, chat templates, byte fallback, incremental
detokenization, and `coscale tokenize` shards read back by train/data.py.

The tokenizers are built here from a few sentences with the `tokenizers` trainer (nothing is
downloaded); `tokenizers` itself and transformers' apply_chat_template are the references.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from coscale.cli import main
from coscale.errors import ConfigError, DataError
from coscale.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    ByteTokenizer,
    ChatTemplate,
    ChatTemplateError,
    HFTokenizer,
    ShardWriter,
    checkpoint_tokenizer,
    encode_text,
    load_tokenizer,
    token_dtype,
)
from coscale.train.data import load_tokens

CORPUS = ["hello world, héllo wörld ✓ 日本語のテキスト", "the quick brown fox jumps over the lazy dog",
          "naïve café déjà vu — “quotes” 🙂 emoji"] * 10
SAMPLES = ["hello wörld", "日本語 ✓ 🙂", "  spaces\nand\ttabs  ", "naïve — “x”", "", "a" * 50, "unseen: ŝ ĳ Ω ∑ 😀"]
DEEPSEEK_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|User|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|Assistant|>{% generation %}{{ message['content'] }}"
    "{% endgeneration %}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|Assistant|>{% endif %}"
)


def byte_level_bpe(vocab_size: int = 400) -> RustTokenizer:
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def byte_fallback_bpe() -> RustTokenizer:
    """A sentencepiece-style BPE: unknown characters become <0xNN> byte tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for word in ["▁hello", "▁world", "h", "e", "l", "o", "w", "r", "d", "▁"]:
        vocab.setdefault(word, len(vocab))
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    byte_level_bpe().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
        "eos_token": {"content": "</s>", "__type": "AddedToken"}, "chat_template": DEEPSEEK_LIKE_TEMPLATE}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 1, 7]}))
    return path


# ---- tokenizer.json --------------------------------------------------------------------------


def test_hf_tokenizer_matches_the_tokenizers_library(hf_dir):
    tok, ref = load_tokenizer(hf_dir), RustTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == ref.get_vocab_size()
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == ref.decode(ids) == text
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert tok.eos_token_ids == (1, 7)  # tokenizer_config's eos, then generation_config's, no repeats
    assert load_tokenizer(hf_dir / "tokenizer.json").vocab_size == tok.vocab_size  # the file path works too
    assert tok.decode([0, *tok.encode("hi"), 1]) == "hi"  # special tokens are skipped


def test_add_bos_token_from_the_config(tmp_path):
    byte_level_bpe().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "add_bos_token": True}))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hi", add_special_tokens=True) == [0, *tok.encode("hi")]
    # a post-processor that already adds the BOS does not get a second one
    rust = byte_level_bpe()
    rust.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    rust.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).encode("hi", add_special_tokens=True) == [0, *tok.encode("hi")]


@pytest.mark.parametrize("build", [byte_level_bpe, byte_fallback_bpe])
def test_token_bytes_concatenate_to_the_utf8_text(build, tmp_path):
    build().save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    for text in SAMPLES[:4] + ["hello world", "ŝ 😀 Ω"]:
        ids = tok.encode(text)
        raw = b"".join(tok.token_bytes(i) for i in ids)
        if build is byte_fallback_bpe and not text.startswith(" "):  # Metaspace puts a space before the text
            raw = raw.removeprefix(b" ")
        assert raw == text.encode("utf-8"), text


def test_token_text_marks_partial_characters(hf_dir):
    tok = ByteTokenizer()
    assert tok.token_text(ord("a")) == "a"
    assert tok.token_text(0xE2) == "bytes:\\xe2"
    hf = load_tokenizer(hf_dir)
    assert "".join(hf.token_text(i) for i in hf.encode("hello world")) == "hello world"


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ConfigError, match="cannot read"):
        load_tokenizer(tmp_path)
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer) and isinstance(load_tokenizer(None), ByteTokenizer)


def test_checkpoint_tokenizer_prefers_the_override_then_the_checkpoint(hf_dir, tmp_path):
    assert isinstance(checkpoint_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(checkpoint_tokenizer(hf_dir), HFTokenizer)
    assert isinstance(checkpoint_tokenizer(hf_dir, "bytes"), ByteTokenizer)


# ---- chat templates ----------------------------------------------------------------------------


def test_chat_template_renders_like_transformers(hf_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    tok = load_tokenizer(hf_dir)
    conversations = [
        [{"role": "user", "content": "Hi ✓"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "<b>again</b>"}],
    ]
    for messages in conversations:
        for add in (True, False):
            expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert tok.render_chat(messages, add) == expected
    rendered = tok.render_chat(conversations[1])
    assert rendered == "<s>Be brief.<|User|>Hi<|Assistant|>Hello!</s><|User|><b>again</b><|Assistant|>"
    # the template wrote the BOS: encoding adds no second one
    assert tok.encode_chat(conversations[0]) == tok.encode("<s><|User|>Hi ✓<|Assistant|>")
    assert tok.encode_chat(conversations[0])[0] == 0 and tok.encode_chat(conversations[0])[1] != 0


def test_chat_template_helpers_and_errors():
    template = ChatTemplate("{{ messages | tojson }}{{ strftime_now('%Y') | length }}{% for m in messages %}"
                            "{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}", {})
    assert template.render([{"role": "user", "content": "<&>"}, {"role": "user", "content": "no"}]) == \
        '[{"role": "user", "content": "<&>"}, {"role": "user", "content": "no"}]4<&>'
    strict = ChatTemplate("{{ raise_exception('roles must alternate') }}", {})
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        strict.render([])
    with pytest.raises(ConfigError, match="does not compile"):
        ChatTemplate("{% for %}", {})
    sandboxed = ChatTemplate("{{ messages.__class__.__mro__ }}", {})
    with pytest.raises(ChatTemplateError):
        sandboxed.render([])


def test_chat_template_sources(tmp_path):
    byte_level_bpe().save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).chat_template.source == DEFAULT_CHAT_TEMPLATE
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert load_tokenizer(tmp_path).chat_template.source == "D"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert load_tokenizer(tmp_path).chat_template.source == "J"
    (tmp_path / "chat_template.jinja").write_text("K")
    assert load_tokenizer(tmp_path).chat_template.source == "K"


def test_byte_tokenizer_default_template():
    text = ByteTokenizer().render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "system: S\nuser: U\nassistant: "
    assert ByteTokenizer().encode_chat([{"role": "user", "content": "é"}], add_generation_prompt=False) == \
        list("user: é\n".encode())


# ---- byte fallback and incremental detokenization ----------------------------------------------


def random_text(rng: random.Random, n: int) -> str:
    pools = ["abc xyz", "éüßñ", "✓—“”", "日本語テ", "🙂😀🚀"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


def test_byte_tokenizer_round_trips():
    tok, rng = ByteTokenizer(), random.Random(0)
    for _ in range(50):
        text = random_text(rng, rng.randrange(0, 30))
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"  # invalid bytes become U+FFFD, never an exception
    assert encode_text(tok, "hé").dtype == np.uint16 and encode_text(tok, "hé").tolist() == [104, 195, 169]


def stream_pieces(tok, ids: list[int]) -> list[str]:
    stream = tok.stream()
    return [stream.push(i) for i in ids] + [stream.finish()]


def test_incremental_detokenization_emits_whole_characters(hf_dir):
    rng = random.Random(1)
    for tok in (ByteTokenizer(), load_tokenizer(hf_dir)):
        for _ in range(30):
            text = random_text(rng, rng.randrange(1, 25))
            ids = tok.encode(text)
            pieces = stream_pieces(tok, ids)
            assert "".join(pieces) == text == tok.decode(ids)
            assert all("\ufffd" not in p for p in pieces)


def test_byte_stream_waits_for_every_byte_of_a_character():
    pieces = stream_pieces(ByteTokenizer(), list("a✓🙂".encode()))
    assert pieces == ["a", "", "", "✓", "", "", "", "🙂", ""]
    assert stream_pieces(ByteTokenizer(), [0xE2, 0x9C]) == ["", "", "\ufffd"]  # cut off: one U+FFFD at the end


def test_hf_stream_with_byte_fallback_tokens(tmp_path):
    byte_fallback_bpe().save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("hello 😀 world")
    assert sum(1 for i in ids if tok.token_bytes(i) and len(tok.token_bytes(i)) == 1 and i < 259) >= 4
    pieces = stream_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == "hello 😀 world"
    assert "😀" in pieces  # the emoji's four byte tokens come out as one piece


# ---- coscale tokenize ---------------------------------------------------------------------------


def test_tokenize_command_writes_shards_that_training_reads(hf_dir, tmp_path, capsys):
    files = []
    for i, text in enumerate(["first document ✓\nline two\n", "second 日本語 document"]):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(text)
    out = tmp_path / "shards"
    code = main(["tokenize", *map(str, files), "--out", str(out), "--tokenizer", str(hf_dir),
                 "--shard-tokens", "7", "--no-progress"])
    assert code == 0
    tok = load_tokenizer(hf_dir)
    expected = []
    for f in files:
        expected += tok.encode(f.read_text()) + [tok.eos_token_ids[0]]
    shards = sorted(out.glob("*.bin"))
    assert len(shards) == -(-len(expected) // 7) and all(s.stat().st_size <= 7 * 2 for s in shards)
    tokens = load_tokens([str(s) for s in shards], vocab_size=tok.vocab_size, bin_dtype="uint16")
    assert tokens.tolist() == expected
    assert "--bin-dtype uint16" in capsys.readouterr().out
    # an output directory that already holds shards is refused, with a one-line error
    assert main(["tokenize", str(files[0]), "--out", str(out), "--no-progress"]) == 2
    assert "already holds .bin files" in capsys.readouterr().err


def test_tokenize_jsonl_with_bytes_and_no_eos(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["ab", "é", "cd"])) + "\n\n")
    out = tmp_path / "out"
    assert main(["tokenize", str(data), "--out", str(out), "--jsonl-key", "text", "--no-eos", "--no-progress"]) == 0
    [shard] = out.glob("*.bin")
    assert load_tokens([str(shard)], 256).tolist() == list("abécd".encode())


def test_tokenize_errors(tmp_path, capsys):
    assert main(["tokenize", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "x"}\n')
    assert main(["tokenize", str(bad), "--out", str(tmp_path / "o2"), "--jsonl-key", "text", "--no-progress"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("ok\ncafé".encode("latin-1"))
    assert main(["tokenize", str(latin1), "--out", str(tmp_path / "o4"), "--no-progress"]) == 2
    assert "not UTF-8 text (byte 6)" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["tokenize", str(empty), "--out", str(tmp_path / "o3"), "--no-progress"]) == 2


def test_large_vocabularies_use_uint32(tmp_path):
    words = [f"w{i}" for i in range(70_000)]
    rust = RustTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    rust.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    rust.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert token_dtype(tok.vocab_size) == np.uint32 and token_dtype(65536) == np.uint16
    (tmp_path / "in.txt").write_text("w5 w69999 w65536")
    out = tmp_path / "out"
    assert main(["tokenize", str(tmp_path / "in.txt"), "--out", str(out), "--tokenizer", str(tmp_path),
                 "--no-progress"]) == 0
    [shard] = out.glob("*.bin")
    assert load_tokens([str(shard)], tok.vocab_size, bin_dtype="uint32").tolist() == [5, 69999, 65536]


def test_shard_writer_splits_exactly(tmp_path):
    writer = ShardWriter(str(tmp_path), np.dtype(np.uint16), shard_tokens=4)
    for chunk in ([1, 2, 3], [], [4, 5, 6, 7, 8, 9], [10]):
        writer.write(chunk)
    writer.close()
    sizes = [np.fromfile(p, dtype=np.uint16).tolist() for p in writer.paths]
    assert sizes == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]] and writer.total == 10
    with pytest.raises(ConfigError):
        ShardWriter(str(tmp_path), np.dtype(np.uint16), shard_tokens=0)


# ---- coscale train --tokenizer -------------------------------------------------------------------


def test_training_text_is_tokenized_with_the_given_tokenizer(hf_dir, tmp_path):
    text = "hello world, hello tokens\n" * 20
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    tok = load_tokenizer(hf_dir)
    tokens = load_tokens([str(tmp_path / "corpus.txt")], vocab_size=tok.vocab_size, tokenizer=str(hf_dir))
    assert tokens.tolist() == tok.encode(text)
    assert len(tokens) < len(text.encode())  # merges: fewer ids than bytes
    with pytest.raises(DataError, match="model's vocabulary has 256"):
        load_tokens([str(tmp_path / "corpus.txt")], vocab_size=256, tokenizer=str(hf_dir))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_tokens([str(tmp_path / "latin1.txt")], vocab_size=tok.vocab_size, tokenizer=str(hf_dir))


def test_train_cli_takes_a_tokenizer(hf_dir, tmp_path, capsys):
    from coscale.config import get_preset

    (tmp_path / "corpus.txt").write_text("hello world, hello tokens\n" * 400, encoding="utf-8")
    args = ["train", "--data", str(tmp_path / "corpus.txt"), "--tokenizer", str(hf_dir), "--steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--no-progress", "--no-tensorboard",
            "--no-checkpoints"]
    assert main(args + ["--model", "tiny", "--out", str(tmp_path / "a")]) == 2  # 256 ids cannot hold 400
    assert "vocabulary has 256" in capsys.readouterr().err
    get_preset("tiny", vocab_size=512).save_json(str(tmp_path / "tiny512.json"))
    assert main(args + ["--model", str(tmp_path / "tiny512.json"), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "metrics.jsonl").exists()
