"""Token ids -> text, one output sequence at a time, with stop strings.

Two problems make streaming text harder than decoding once at the end:

- A token is not a piece of text. In byte-level BPE one character (an emoji, a CJK
  character) may span several tokens, and decoding the first of them alone gives U+FFFD;
  SentencePiece tokenizers drop a word's leading space when it is decoded at the start of a
  sequence. So each step decodes a short window of previous tokens with and without the new
  ones and emits the difference, and waits while the result ends in an incomplete character.
- A stop string may arrive split over several tokens. Text that could be the start of a stop
  string is held back until it either completes the stop (then it is cut, never sent) or
  cannot anymore (then it is sent).

Each push decodes only the window, so the cost per token does not grow with the output.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenfactory.engine.tokenizer import Tokenizer

PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens kept as decoding context for the first output tokens (leading spaces)."""
MAX_INCOMPLETE_TOKENS = 3
"""An incomplete UTF-8 character has at most 3 bytes, so it lies within the last 3 tokens."""
_REPLACEMENT = "\ufffd"


class TextStream:
    """Incremental detokenizer with stop strings for one output sequence."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.skip_special_tokens = skip_special_tokens
        self.stop_reason: str | None = None
        """The stop string that ended the text, once one matched."""
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # start of the decoding window in _ids
        self._read_offset = len(self._ids)  # _ids before this are already in _text
        self._text = ""  # decoded output so far (cut at a stop string)
        self._num_emitted = 0  # characters of _text handed out by push/finish
        self._finished = False
        self._max_stop_len = max(map(len, self.stop), default=0)

    @property
    def text(self) -> str:
        """All text emitted so far; after `finish()` the whole output (without any stop string)."""
        return self._text[: self._num_emitted]

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def push(self, token_ids: Sequence[int]) -> tuple[str, str | None]:
        """Add new tokens; return the text now safe to send and the stop string that matched.

        The stop string is returned only by the push that matched it; later pushes return
        `("", None)`.
        """
        if self.stopped or self._finished or not token_ids:
            return "", None
        self._ids.extend(token_ids)
        new_text = self._decode_new_text(force=False)
        if not new_text:
            return "", None
        searched_up_to = len(self._text)
        self._text += new_text
        if self.stop:
            cut = self._find_stop(max(0, searched_up_to - self._max_stop_len + 1))
            if cut is not None:
                return self._emit_until(cut), self.stop_reason
            return self._emit_until(len(self._text) - self._stop_prefix_len()), None
        return self._emit_until(len(self._text)), None

    def finish(self) -> str:
        """End the sequence: release any held-back text (nothing after a stop string)."""
        if self._finished:
            return ""
        self._finished = True
        if self.stopped:
            return ""
        tail = self._decode_new_text(force=True)
        self._text += tail
        cut = self._find_stop(max(0, len(self._text) - len(tail) - self._max_stop_len + 1)) if tail else None
        return self._emit_until(len(self._text) if cut is None else cut)

    def _decode_new_text(self, force: bool) -> str:
        """Text of the tokens after the read offset, minus a trailing incomplete character.

        Only the last `MAX_INCOMPLETE_TOKENS` tokens can hold an unfinished character, so
        at most that many are held back; text before them is final even if it contains
        U+FFFD (invalid bytes stay invalid).
        With `force`, everything is decoded as it is.
        """
        end = len(self._ids)
        if self._read_offset == end:
            return ""
        decode, skip = self.tokenizer.decode, self.skip_special_tokens
        full = decode(self._ids[self._prefix_offset : end], skip)
        if full.endswith(_REPLACEMENT) and not force:
            if end - self._read_offset <= MAX_INCOMPLETE_TOKENS:
                return ""
            end, full = self._complete_part(end)
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], skip)
        if full.startswith(prefix):
            new_text = full[len(prefix) :]
        else:
            # The window's start decodes differently once extended (after invalid bytes):
            # decode the new tokens alone rather than emit a wrong difference.
            new_text = decode(self._ids[self._read_offset : end], skip)
        self._prefix_offset, self._read_offset = self._read_offset, end
        return new_text

    def _complete_part(self, end: int) -> tuple[int, str]:
        """The longest window ending at most 3 tokens before `end` that decodes cleanly.

        If none does, the bytes before the last 3 tokens are invalid for good: emit them.
        """
        for cut in range(end - 1, end - MAX_INCOMPLETE_TOKENS - 1, -1):
            text = self.tokenizer.decode(self._ids[self._prefix_offset : cut], self.skip_special_tokens)
            if not text.endswith(_REPLACEMENT):
                return cut, text
        return cut, text

    def _find_stop(self, start: int) -> int | None:
        """Cut the text at the earliest stop string found at or after `start`; its index or None."""
        best: tuple[int, str] | None = None
        for stop in self.stop:
            i = self._text.find(stop, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, stop)
        if best is None:
            return None
        self._text = self._text[: best[0]]
        self.stop_reason = best[1]
        return best[0]

    def _stop_prefix_len(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        text = self._text
        for n in range(min(len(text), self._max_stop_len - 1), 0, -1):
            suffix = text[-n:]
            if any(stop.startswith(suffix) for stop in self.stop):
                return n
        return 0

    def _emit_until(self, end: int) -> str:
        end = max(end, self._num_emitted)
        out = self._text[self._num_emitted : end]
        self._num_emitted = end
        return out
