import pytest

from shoal.workers.chunking import chunk_text, token_windows


def test_windows_cover_everything_with_overlap():
    w = list(token_windows(10, 4, 1))
    assert w == [(0, 4), (3, 7), (6, 10)]
    assert list(token_windows(3, 4, 1)) == [(0, 3)]
    assert list(token_windows(0, 4, 1)) == []
    with pytest.raises(ValueError):
        list(token_windows(5, 4, 4))


TEXTS = [
    "Plain ASCII text. " * 300,
    "Ünïcödé — naïve café; 日本語のテキストも混ざる。 emoji 🚀 here.\n\n" * 40,
    "def f(x):\n    return x ** 2  # code\n" * 100,
    "short",
]


@pytest.mark.parametrize("text", TEXTS)
def test_offsets_round_trip(lm, text):
    chunks = chunk_text(text, lm.tokenizer, size=64, overlap=8)
    assert chunks, "non-empty text gives chunks"
    for i, c in enumerate(chunks):
        assert c.ordinal == i
        assert text[c.start:c.end] == c.text
        assert c.text.strip()
    # windows move forward and cover the text from first to last token
    assert chunks[0].start == len(text) - len(text.lstrip())
    assert chunks[-1].end == len(text.rstrip())
    assert all(b.start > a.start and b.start < a.end for a, b in zip(chunks, chunks[1:]))


def test_chunk_token_budget(lm):
    text = "word " * 1000
    chunks = chunk_text(text, lm.tokenizer, size=50, overlap=10)
    for c in chunks:
        n = len(lm.tokenizer(c.text, add_special_tokens=False)["input_ids"])
        assert n <= 50
    assert len(chunks) == 25  # 1000 tokens, step 40


def test_blank_text_gives_no_chunks(lm):
    assert chunk_text("  \n\t ", lm.tokenizer) == []


def test_reader_tokenizer_chunks_exactly_as_transformers(lm):
    """Readers load tokenizer.json with `tokenizers` alone; chunks (hence ids) must not change."""
    from conftest import cranfield_docs
    from shoal.workers.reader import tokenizer_for

    fast = tokenizer_for("all-MiniLM-L6-v2", False)
    assert type(fast).__module__.startswith("tokenizers")
    texts = [d["title"] + "\n\n" + d["text"] for d in cranfield_docs(60)]
    texts += ["Ünïcödé — “quotes”, emoji 🚀 and CJK 漢字 mixed\twith tabs\n\nand   spaces " * 30, "x" * 5000]
    for t in texts:
        assert chunk_text(t, fast, 64, 8) == chunk_text(t, lm.tokenizer, 64, 8)
