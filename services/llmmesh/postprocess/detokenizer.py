"""Incremental detokenization that is exact by construction.

A byte-level BPE token is a run of bytes, and the full decode of a sequence is the UTF-8 decode of
all its bytes laid end to end (special tokens contribute nothing, as with skip_special_tokens). So the
incremental decoder only has to feed each token's bytes to Python's incremental UTF-8 decoder: it
emits whole characters only, holds back a character split across tokens (CJK, emoji, accented letters,
single-byte fallback tokens) until its last byte arrives, and its outputs concatenate to exactly the
full decode, U+FFFD included where the bytes really are invalid. No re-decoding of windows.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from llmmesh.common.errors import InvalidArgument

__all__ = ["IncrementalDetokenizer"]


class IncrementalDetokenizer:
    def __init__(self, token_bytes: Sequence[bytes]) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: Sequence[int]) -> str:
        """Text completed by these ids (possibly empty: a character may still be incomplete)."""
        table = self._token_bytes
        try:
            data = b"".join([table[i] for i in ids])
            if min(ids, default=0) < 0:
                raise IndexError
        except IndexError:
            bad = next(i for i in ids if not 0 <= i < len(table))
            raise InvalidArgument(
                "tokens.ids", f"token id {bad} is outside the vocabulary (0..{len(table) - 1})"
            ) from None
        return self._decoder.decode(data)

    def feed_each(self, ids: Sequence[int]) -> list[str]:
        """The text each id completes, in order (all ids are checked before any is decoded)."""
        table = self._token_bytes
        if any(not 0 <= i < len(table) for i in ids):
            self.feed([i for i in ids if not 0 <= i < len(table)][:1])  # raises, naming the id
        decode = self._decoder.decode
        return [decode(table[i]) for i in ids]

    def flush(self) -> str:
        """The rest at end of stream: an incomplete trailing character becomes U+FFFD, as in a full decode."""
        return self._decoder.decode(b"", final=True)
