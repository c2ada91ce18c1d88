"""Token-aware chunking with character offsets back into the source text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional


from shoal.workers.embed import TokenBatch


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
    return _windows(text, tokenizer, size, overlap)[0]


def _windows(text: str, tokenizer: Any, size: int, overlap: int) -> tuple[list[Chunk], list[Optional[list[int]]]]:
    """The chunks, and for each the token ids of its window (without special tokens) where they are what the
    tokenizer gives for the chunk's text alone, else None (see :func:`chunk_with_ids`)."""
    if not text.strip():
        return [], []
    reuse: Optional[str] = None
    tokens: list[str] = []
    all_ids: list[int] = []
    if hasattr(tokenizer, "encode_batch"):  # a `tokenizers.Tokenizer` (what readers load: 30 ms, no transformers)
        enc = tokenizer.encode(text, add_special_tokens=False)
        pairs, reuse = enc.offsets, wordpiece_prefix(tokenizer)
        if reuse is not None:  # Encoding's .tokens and .ids build a new list on every access: once, here
            tokens, all_ids = enc.tokens, enc.ids
    else:  # a transformers fast tokenizer
        pairs = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    keep = [i for i, (a, b) in enumerate(pairs) if b > a]
    chunks: list[Chunk] = []
    ids: list[Optional[list[int]]] = []
    for i0, i1 in token_windows(len(keep), size, overlap):
        start, end = pairs[keep[i0]][0], pairs[keep[i1 - 1]][1]
        chunks.append(Chunk(len(chunks), start, end, text[start:end]))
        j0, j1 = keep[i0], keep[i1 - 1] + 1
        # WordPiece cuts a word greedily from its left: a window that starts a word and holds every token
        # of its span tokenizes alone exactly as in its file (a cut word's first pieces are its pieces)
        same = reuse is not None and j1 - j0 == i1 - i0 and not tokens[j0].startswith(reuse)
        ids.append(all_ids[j0:j1] if same else None)
    return chunks, ids


@dataclass(frozen=True)
class InputSpec:
    """How a chunk becomes model input: special tokens around its ids, cut to ``max_len`` in all."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    max_len: int

    def wrap(self, body: list[int]) -> list[int]:
        return [*self.prefix, *body[:max(0, self.max_len - len(self.prefix) - len(self.suffix))], *self.suffix]


def input_spec(tokenizer: Any, max_len: int) -> InputSpec:
    """The special tokens the tokenizer's template puts around one sequence ([CLS] ... [SEP] for BERT)."""
    if hasattr(tokenizer, "encode_batch"):
        bare, full = tokenizer.encode("a", add_special_tokens=False).ids, tokenizer.encode("a").ids
    else:
        bare = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return InputSpec(tuple(full[:i]), tuple(full[i + len(bare):]), max_len)
    raise ValueError(f"cannot find a sequence inside its tokenizer template: {bare} in {full}")


def wordpiece_prefix(tokenizer: Any) -> Optional[str]:
    """"##" for a BERT WordPiece tokenizer (its windows' ids can be reused), None for any other."""
    try:
        from tokenizers import models, pre_tokenizers
    except ImportError:
        return None
    if isinstance(tokenizer.model, models.WordPiece) and isinstance(tokenizer.pre_tokenizer,
                                                                       pre_tokenizers.BertPreTokenizer):
        return str(tokenizer.model.continuing_subword_prefix)
    return None


def chunk_with_ids(text: str, tokenizer: Any, size: int, overlap: int,
                   spec: InputSpec) -> tuple[list[Chunk], TokenBatch]:
    """:func:`chunk_text`, and each chunk's model input ids: exactly what the model's tokenizer gives for
    the chunk's text (special tokens added, cut at ``spec.max_len``), so the embedding actors never
    tokenize. A WordPiece window that starts a word reuses the file's own token ids; any other chunk
    (a window starting mid-word, another kind of tokenizer) is encoded again, all of them in one call."""
    chunks, bodies = _windows(text, tokenizer, size, overlap)
    again = [i for i, b in enumerate(bodies) if b is None]
    if again:
        for i, body in zip(again, _encode_bodies([chunks[i].text for i in again], tokenizer, spec)):
            bodies[i] = body
    return chunks, TokenBatch.from_rows([spec.wrap(b) for b in bodies])  # type: ignore[arg-type]


def _encode_bodies(texts: list[str], tokenizer: Any, spec: InputSpec) -> list[list[int]]:
    """Token ids of each text alone, without the template's special tokens."""
    a, z = len(spec.prefix), len(spec.suffix)
    if hasattr(tokenizer, "encode_batch"):
        full = [e.ids for e in tokenizer.encode_batch(texts)]
    else:
        full = tokenizer(texts, verbose=False)["input_ids"]
    return [ids[a:len(ids) - z] for ids in full]
