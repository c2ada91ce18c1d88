"""Token-aware chunking with character offsets back into the source text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator


@dataclass(frozen=True)
class Chunk:
    ordinal: int
    start: int  # character offset into the file's text
    end: int
    text: str


def token_windows(n_tokens: int, size: int, overlap: int) -> Iterator[tuple[int, int]]:
    """Yield (i0, i1) token windows of ``size`` with ``overlap``, covering [0, n_tokens)."""
    if size <= 0 or not 0 <= overlap < size:
        raise ValueError(f"need size > 0 and 0 <= overlap < size, got size={size}, overlap={overlap}")
    step = size - overlap
    i0 = 0
    while i0 < n_tokens:
        i1 = min(i0 + size, n_tokens)
        yield i0, i1
        if i1 == n_tokens:
            return
        i0 += step


def chunk_text(text: str, tokenizer: Any, size: int = 200, overlap: int = 40) -> list[Chunk]:
    """Split ``text`` into windows of ``size`` tokens (``overlap`` shared).

    ``tokenizer``: a ``tokenizers.Tokenizer`` or a transformers fast tokenizer (the same offsets).
    Offsets come from the fast tokenizer's offset mapping, so
    ``text[c.start:c.end] == c.text`` always holds.
    """
    if not text.strip():
        return []
    if hasattr(tokenizer, "encode_batch"):  # a `tokenizers.Tokenizer` (what readers load: 30 ms, no transformers)
        pairs = tokenizer.encode(text, add_special_tokens=False).offsets
    else:  # a transformers fast tokenizer
        pairs = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    offsets = [(a, b) for a, b in pairs if b > a]
    chunks = []
    for i0, i1 in token_windows(len(offsets), size, overlap):
        start, end = offsets[i0][0], offsets[i1 - 1][1]
        chunks.append(Chunk(len(chunks), start, end, text[start:end]))
    return chunks
