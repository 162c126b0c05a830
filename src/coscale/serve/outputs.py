"""From engine outputs (token ids) to the text a client sees: detokenization, stop strings, logprobs.

Stop strings are the server's job (the engine stops only at token ids). Text is held back while its
tail could still be the start of a stop string, so a streamed reply never shows part of a stop string
that then gets cut: at most ``longest stop - 1`` characters wait, and they go out when the request
finishes. Streamed pieces joined equal the non-streamed text.
"""

from __future__ import annotations

from dataclasses import dataclass

from coscale.tokenizer import Tokenizer


@dataclass
class TokenInfo:
    """One generated token for logprobs: its text (``bytes:\\x..`` for a partial character), raw bytes,
    where its text begins in the reply (characters), its logprob and the top alternatives as
    (text, logprob) with their raw bytes."""

    token_id: int
    text: str
    offset: int
    raw: bytes
    logprob: float
    top: list[tuple[str, float]] | None
    top_raw: list[bytes] | None


@dataclass
class Piece:
    """What one engine output adds to a reply."""

    text: str
    tokens: list[TokenInfo]  # logprob entries of the tokens consumed (empty unless logprobs were asked)
    finish_reason: str | None  # "stop" | "length" once finished, else None


class ChoiceText:
    """The growing text of one reply; ``add`` each RequestOutput of its request in order."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], logprobs: int | None) -> None:
        self.tokenizer, self.stops, self.logprobs = tokenizer, stops, logprobs
        self._stream = tokenizer.stream()
        self._holdback = max((len(s) for s in stops), default=1) - 1
        self._full = ""  # all text decoded so far
        self.text = ""  # the part already handed out
        self.prompt_tokens = self.completion_tokens = 0
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, output) -> Piece:
        """Consume one output; after a stop string the caller must abort the engine request."""
        if self.finished:
            return Piece("", [], self.finish_reason)
        self.prompt_tokens, self.completion_tokens = output.prompt_tokens, output.completion_tokens
        offsets = []
        for token_id in output.new_token_ids:
            offsets.append(len(self._full))
            self._full += self._stream.push(token_id)
        if output.finished:
            self._full += self._stream.finish()
        tokens = self._token_infos(output.new_logprobs, offsets) if self.logprobs is not None else []
        end = self._stop_at()
        if end is not None:
            self.finish_reason = "stop"
        elif output.finished:
            end, self.finish_reason = len(self._full), output.finish_reason
        else:
            end = max(len(self.text), len(self._full) - self._holdback)
        piece = self._full[len(self.text):end]
        self.text += piece
        return Piece(piece, tokens, self.finish_reason)

    def _stop_at(self) -> int | None:
        """Where the earliest stop string begins; matches cannot begin inside text already handed out."""
        found = [i for i in (self._full.find(s, len(self.text)) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _token_infos(self, logprobs, offsets: list[int]) -> list[TokenInfo]:
        tok = self.tokenizer
        out = []
        for entry, offset in zip(logprobs or [], offsets):
            top = [(tok.token_text(i), float(lp)) for i, lp in entry.top]
            out.append(TokenInfo(entry.token_id, tok.token_text(entry.token_id), offset,
                                 tok.token_bytes(entry.token_id), float(entry.logprob), top,
                                 [tok.token_bytes(i) for i, _ in entry.top]))
        return out
