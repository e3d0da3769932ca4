"""Counting a long text's tokens piece by piece, to stop early: llama.cpp tokenizes a whole text in one call,
which for megabytes takes seconds and 20 to 100 times the text's size in memory, where a context holds a few
thousand tokens. Counted in pieces, a prompt far longer than the context is known for what it is after the
first pieces that overflow it.
"""

from __future__ import annotations

from collections.abc import Callable

PIECE = 16 * 1024
"""Characters per piece: tokenizing one takes milliseconds and a few MiB."""
LONG = 4 * PIECE
"""Texts up to this long are tokenized whole at once, as they always were."""


def count_tokens(count: Callable[[str], int], text: str, limit: int) -> tuple[int, int]:
    """(tokens, characters): the tokens of `text` counted piece by piece (`count` tokenizes one piece), stopping
    at the first piece that takes the count past `limit`; the characters counted so far.

    Pieces end before a space or a line break where there is one, so that words are tokenized whole; a count
    may still be off by a token or two a piece from the whole text's (merges across a piece's edges, a BOS
    each), which is why callers compare it with a generous `limit`, twice the context.
    """
    tokens = start = 0
    while start < len(text) and tokens <= limit:
        end = min(start + PIECE, len(text))
        if end < len(text):
            space = max(text.rfind(" ", start + PIECE // 2, end), text.rfind("\n", start + PIECE // 2, end))
            end = space if space > start else end
        tokens += count(text[start:end])
        start = end
    return tokens, start
