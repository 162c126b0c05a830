"""Tokenizers: a checkpoint's ``tokenizer.json``, its chat template, and the byte-level fallback.

Three jobs share this module: the server encodes prompts, renders chat messages and detokenizes
streamed tokens; ``coscale tokenize`` writes ``.bin`` shards for training; ``coscale train --tokenizer``
encodes text files with :func:`encode_text`.

- :class:`HFTokenizer` reads ``tokenizer.json`` with the ``tokenizers`` library (offline, no
  ``transformers``), the special tokens from ``tokenizer_config.json`` and the extra end-of-sequence ids
  from ``generation_config.json``.
- :class:`ByteTokenizer` is UTF-8 bytes as ids 0..255, the tokenizer coscale trains with by default
  (``coscale.train.data`` uses the same mapping), so a ``tiny`` checkpoint without tokenizer files
  still serves text.
- :class:`ChatTemplate` renders messages with the checkpoint's jinja2 template the way transformers'
  ``apply_chat_template`` does: a sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, the
  loop-control extension, a ``tojson`` filter that does not escape HTML, ``raise_exception`` and
  ``strftime_now``, and the variables ``messages``, ``add_generation_prompt`` and the special tokens
  (``bos_token``, ``eos_token``, ...). The rendered text already holds the template's BOS, so it is
  encoded without special tokens. A checkpoint without a template gets :data:`DEFAULT_CHAT_TEMPLATE`.
- :meth:`Tokenizer.stream` returns an incremental detokenizer: text comes out only once whole UTF-8
  characters exist, so a character split over several tokens is never emitted in halves.
"""

from __future__ import annotations

import codecs
import datetime
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property

import numpy as np

from coscale.errors import ConfigError, CoscaleError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
BYTES = "bytes"  # the name that selects the byte-level tokenizer

# For checkpoints without a template (coscale's byte-level models): one "role: content" line per
# message, then "assistant: " when a reply is wanted.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
_BYTE_FALLBACK_RE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class ChatTemplateError(CoscaleError):
    """Messages that the chat template refuses (the template's own raise_exception, or a jinja error)."""


# ---- chat template --------------------------------------------------------------------------------


class ChatTemplate:
    """A compiled jinja2 chat template with transformers' conventions."""

    def __init__(self, source: str, special_tokens: dict[str, str | None]) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens)
        self._template = _compile_template(source)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        import jinja2

        variables = {**self.special_tokens, **kwargs}
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **variables)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from None


def _compile_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # transformers marks assistant text with {% generation %} ... {% endgeneration %} to build
        # training masks; rendering for inference only needs the text inside.
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"chat template does not compile: {e}") from None


# ---- incremental detokenization ----------------------------------------------------------------


class ByteStream:
    """Incremental UTF-8 decoding of byte tokens: a partial character waits for its other bytes."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(bytes([token_id]))

    def finish(self) -> str:
        return self._decoder.decode(b"", final=True)  # an unfinished character becomes U+FFFD


class HFStream:
    """``tokenizers``' DecodeStream: emits text once the tokens seen form whole characters."""

    def __init__(self, tokenizer) -> None:
        from tokenizers.decoders import DecodeStream

        self._tokenizer, self._stream = tokenizer, DecodeStream(skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        return self._stream.step(self._tokenizer, token_id) or ""

    def finish(self) -> str:
        return ""


# ---- tokenizers ---------------------------------------------------------------------------------


class Tokenizer(ABC):
    """What the server, ``coscale tokenize`` and training need from a tokenizer."""

    name: str
    vocab_size: int
    bos_token: str | None = None
    eos_token: str | None = None
    eos_token_ids: tuple[int, ...] = ()  # generation stops at any of these
    chat_template: ChatTemplate

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text``."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a token may hold part of a UTF-8 character)."""

    @abstractmethod
    def stream(self) -> ByteStream | HFStream:
        """An incremental detokenizer for one reply."""

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        return self.chat_template.render(messages, add_generation_prompt)

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes the BOS itself: encoding with special tokens would add a second one.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        """A token as text for logprobs; a partial UTF-8 character reads ``bytes:\\xe2\\x9c``, as OpenAI's."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255: no special tokens, no end-of-sequence id, nothing to load."""

    name = BYTES
    vocab_size = 256

    def __init__(self) -> None:
        self.chat_template = ChatTemplate(DEFAULT_CHAT_TEMPLATE, {})

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id])

    def stream(self) -> ByteStream:
        return ByteStream()


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` (plus the optional config files beside it), through ``tokenizers``."""

    def __init__(self, directory: str) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.name = directory
        path = os.path.join(directory, TOKENIZER_FILE)
        try:
            self._tokenizer = RustTokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception for a corrupt file
            raise ConfigError(f"cannot read {path}: {e}") from None
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        config = _read_json(os.path.join(directory, TOKENIZER_CONFIG_FILE))
        special = {key: _token_content(config.get(key)) for key in
                   ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.bos_token, self.eos_token = special["bos_token"], special["eos_token"]
        self._add_bos = bool(config.get("add_bos_token", False)) and self.bos_token is not None
        self.eos_token_ids = self._eos_ids(directory)
        source = _chat_template_source(directory, config) or DEFAULT_CHAT_TEMPLATE
        self.chat_template = ChatTemplate(source, special)

    def _eos_ids(self, directory: str) -> tuple[int, ...]:
        ids = []
        if self.eos_token is not None and self._tokenizer.token_to_id(self.eos_token) is not None:
            ids.append(self._tokenizer.token_to_id(self.eos_token))
        extra = _read_json(os.path.join(directory, GENERATION_CONFIG_FILE)).get("eos_token_id")
        ids += extra if isinstance(extra, list) else [] if extra is None else [extra]
        return tuple(dict.fromkeys(int(i) for i in ids))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._add_bos:
            # tokenizer_config.json asks for a BOS that the tokenizer.json's post-processor may lack.
            bos = self._tokenizer.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    @cached_property
    def _byte_level(self) -> dict[str, int] | None:
        """GPT-2's byte-to-character table inverted, when the decoder is byte-level: printable bytes
        stand for themselves, the other bytes for chr(256), chr(257), ... in byte order."""
        from tokenizers import decoders

        if not isinstance(self._tokenizer.decoder, decoders.ByteLevel):
            return None
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        others = [b for b in range(256) if b not in printable]
        return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}

    def token_bytes(self, token_id: int) -> bytes:
        token = self._tokenizer.id_to_token(token_id)
        if token is None:
            return b""
        match = _BYTE_FALLBACK_RE.match(token)
        if match:
            return bytes([int(match[1], 16)])
        table = self._byte_level
        if table is not None and all(c in table for c in token):
            return bytes(table[c] for c in token)
        # sentencepiece-style vocabularies write a space as "▁"; decoding the token alone would strip it
        return token.replace("\u2581", " ").encode("utf-8")

    def stream(self) -> HFStream:
        return HFStream(self._tokenizer)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    return value if isinstance(value, dict) else {}


def _token_content(value) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_source(directory: str, config: dict) -> str | None:
    """The template from chat_template.jinja, chat_template.json or tokenizer_config.json, in that order."""
    jinja_path, json_path = (os.path.join(directory, f) for f in CHAT_TEMPLATE_FILES)
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template = _read_json(json_path).get("chat_template") or config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def load_tokenizer(path: str | os.PathLike | None) -> Tokenizer:
    """``"bytes"`` or None: the byte-level tokenizer; a directory holding tokenizer.json (a checkpoint)
    or the tokenizer.json file itself: that tokenizer."""
    if path is None or os.fspath(path) == BYTES:
        return ByteTokenizer()
    path = os.fspath(path)
    if os.path.isfile(path):
        if os.path.basename(path) != TOKENIZER_FILE:  # its config files are looked up beside it by name
            raise ConfigError(f"{path} is not a {TOKENIZER_FILE}: pass the directory holding {TOKENIZER_FILE}, "
                              "the file of that name, or 'bytes'")
        path = os.path.dirname(path) or "."
    if not os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
        raise ConfigError(f"no {TOKENIZER_FILE} in {path} (pass a directory or file holding one, or 'bytes')")
    return HFTokenizer(path)


def checkpoint_tokenizer(checkpoint: str | os.PathLike, override: str | None = None) -> Tokenizer:
    """The tokenizer for serving a checkpoint: ``override`` when given, else the checkpoint's own
    tokenizer.json, else the byte-level tokenizer."""
    if override is not None:
        return load_tokenizer(override)
    if os.path.isfile(os.path.join(os.fspath(checkpoint), TOKENIZER_FILE)):
        return HFTokenizer(os.fspath(checkpoint))
    return ByteTokenizer()


# ---- token files for training --------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocabularies up to 65536), else uint32: what train/data.py reads."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def encode_text(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Text as a 1-D array of ids in :func:`token_dtype` (what ``coscale train --tokenizer`` needs)."""
    return np.asarray(tokenizer.encode(text), dtype=token_dtype(tokenizer.vocab_size))


def iter_documents(path: str, jsonl_key: str | None = None,
                   chunk_bytes: int = 1 << 20) -> Iterator[tuple[str, int, bool]]:
    """(text, bytes read, document ends here) pieces of one input file.

    A JSONL file (``jsonl_key`` set) holds one document per line. A text file is one document, read
    in pieces of about ``chunk_bytes`` that end at a line break, so a file larger than memory works;
    the pieces are encoded separately, which may split a token that spans a line break.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CoscaleError(f"cannot read {path}: {e.strerror}") from None
    with f:
        if jsonl_key is not None:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield _jsonl_text(path, number, line, jsonl_key), len(line), True
            return
        offset = 0
        while piece := f.read(chunk_bytes):
            piece += f.readline()  # finish the line so that pieces split at line breaks
            yield _utf8(path, piece, offset), len(piece), False
            offset += len(piece)
    yield "", 0, True


def _utf8(path: str, raw: bytes, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CoscaleError(f"{path}: not UTF-8 text (byte {offset + e.start}); convert it first") from None


def _jsonl_text(path: str, number: int, line: bytes, key: str) -> str:
    try:
        record = json.loads(line)
    except ValueError:
        raise CoscaleError(f"{path}:{number}: not a JSON line") from None
    text = record.get(key) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise CoscaleError(f"{path}:{number}: no string field {key!r}")
    return text


class ShardWriter:
    """Token ids into ``DIR/PREFIX-00000.bin``, ``-00001.bin``, ...: header-free arrays of at most
    ``shard_tokens`` ids each, in the dtype that train/data.py reads with ``--bin-dtype``."""

    def __init__(self, out_dir: str, dtype: np.dtype, shard_tokens: int, prefix: str = "tokens") -> None:
        if shard_tokens < 1:
            raise ConfigError(f"shard size must be >= 1 token, got {shard_tokens}")
        self.out_dir, self.dtype, self.shard_tokens, self.prefix = out_dir, dtype, shard_tokens, prefix
        self.paths: list[str] = []
        self.total = 0
        self._file, self._in_shard = None, 0

    def write(self, ids: Sequence[int] | np.ndarray) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        while ids.size:
            if self._file is None or self._in_shard == self.shard_tokens:
                self._next_shard()
            take = min(ids.size, self.shard_tokens - self._in_shard)
            self._file.write(ids[:take].tobytes())
            self._in_shard += take
            self.total += take
            ids = ids[take:]

    def _next_shard(self) -> None:
        self.close()
        path = os.path.join(self.out_dir, f"{self.prefix}-{len(self.paths):05d}.bin")
        self._file, self._in_shard = open(path, "wb"), 0  # noqa: SIM115 (kept open across writes)
        self.paths.append(path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def tokenize_files(paths: Sequence[str], tokenizer: Tokenizer, out_dir: str, *, shard_tokens: int,
                   jsonl_key: str | None = None, append_eos: bool = True, progress: bool = True) -> ShardWriter:
    """Encode text or JSONL files into ``.bin`` shards in ``out_dir``; returns the closed writer
    (its ``paths`` and ``total``). Documents are separated by the tokenizer's EOS when it has one."""
    from tqdm import tqdm

    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise CoscaleError(f"input file not found: {missing[0]}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CoscaleError(f"--out {out_dir} exists and is not a directory")
    if os.path.exists(out_dir) and any(f.endswith(".bin") for f in os.listdir(out_dir)):
        raise CoscaleError(f"{out_dir} already holds .bin files; choose another --out or remove them")
    os.makedirs(out_dir, exist_ok=True)
    eos = tokenizer.eos_token_ids[:1] if append_eos else ()
    writer = ShardWriter(out_dir, token_dtype(tokenizer.vocab_size), shard_tokens)
    total_bytes = sum(os.path.getsize(p) for p in paths)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress) as bar:
        try:
            for path in paths:
                for text, size, ends in iter_documents(path, jsonl_key):
                    writer.write(tokenizer.encode(text) if text else [])
                    if ends:
                        writer.write(eos)
                    bar.update(size)
                    bar.set_postfix(tokens=writer.total, refresh=False)
        finally:
            writer.close()
    if writer.total == 0:
        raise CoscaleError("the inputs hold no text to tokenize")
    return writer
