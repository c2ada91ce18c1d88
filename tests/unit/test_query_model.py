"""The query card: a CPU process loads a checked ONNX export without torch, and only while nothing it was
checked against has changed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shoal.workers.embed import encode, load_model, resolve_model_path
from shoal.workers.query_model import (DirectTokenizer, cuda_absent, direct_tokenizer_agrees, load_query_model,
                                       onnx_cache_dir, read_card, tokenizer_probe)

QUERIES = ["wing flutter at supersonic speed", "heat transfer in a laminar boundary layer", "x", ""]

# a fresh process: which heavy modules did loading the query encoder import, and what does it answer?
CHILD = """
import json, sys
from shoal.workers.query_model import load_query_model
qm = load_query_model(sys.argv[1], device="auto", threads=1)
print(json.dumps({"torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules,
                  "runtime": qm.runtime, "fingerprint": qm.fingerprint, "dim": qm.dim,
                  "max_seq_length": qm.lm.max_seq_length, "vectors": qm.encode(json.loads(sys.argv[2])).tolist()}))
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """An XDG cache of this module's own: its exports and cards start empty."""
    path = tmp_path_factory.mktemp("xdg")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(path)
    yield path
    if old is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A copy of the bundled model's directory, for the tests that change it."""
    out = tmp_path_factory.mktemp("model") / "minilm"
    shutil.copytree(resolve_model_path("all-MiniLM-L6-v2"), out)
    return out


@pytest.fixture(scope="module")
def full(cache, model_dir):
    """The full load (torch, weights, fingerprint, export, check) that files the card."""
    assert read_card(str(model_dir)) is None
    qm = load_query_model(str(model_dir), device="cpu", threads=2)
    assert qm.lm.model is not None  # no card yet: the weights were loaded
    return qm, qm.lm


def child(model: Path, cache: Path, texts=QUERIES, **env) -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD, str(model), json.dumps(texts)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "XDG_CACHE_HOME": str(cache), **env})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_full_load_files_a_card_and_the_next_process_loads_from_it_without_torch(full, cache, model_dir):
    qm, lm = full
    assert qm.runtime == "onnx"
    card = read_card(str(model_dir))
    assert card is not None and card["fingerprint"] == lm.fingerprint and card["dim"] == 384
    assert card["min_cosine"] >= 0.9999 and (onnx_cache_dir() / card["onnx"]).is_file()
    got = child(model_dir, cache)
    assert got["torch"] is False and got["transformers"] is False, got  # nothing of PyTorch's was loaded
    assert got["runtime"] == "onnx" and got["fingerprint"] == lm.fingerprint and got["dim"] == lm.dim
    assert got["max_seq_length"] == lm.max_seq_length
    vec = np.asarray(got["vectors"], dtype=np.float32)
    assert np.allclose(vec, qm.encode(QUERIES), atol=1e-6)  # the same graph, the same ids
    assert float((vec * encode(QUERIES, lm)).sum(1).min()) > 0.9999  # PyTorch's vectors


def test_a_changed_model_directory_takes_the_full_load_and_files_a_new_card(full, cache, model_dir):
    assert read_card(str(model_dir)) is not None
    cfg = model_dir / "config.json"
    st = cfg.stat()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the same bytes, written again
    assert read_card(str(model_dir)) is None
    qm = load_query_model(str(model_dir), device="cpu", threads=2)
    assert qm.lm.model is not None and qm.runtime == "onnx"  # the weights were loaded and hashed again
    assert qm.fingerprint == full[1].fingerprint  # ... to the same fingerprint
    assert read_card(str(model_dir)) is not None  # and the card was filed under the directory as it is now


def test_an_export_changed_since_its_check_is_not_trusted(full, cache, model_dir):
    card = read_card(str(model_dir))
    onnx = onnx_cache_dir() / card["onnx"]
    st = onnx.stat()
    os.utime(onnx, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert read_card(str(model_dir)) is None
    assert load_query_model(str(model_dir), device="cpu", threads=2).lm.model is not None  # loaded in full again ...
    assert read_card(str(model_dir))["onnx_mtime_ns"] == onnx.stat().st_mtime_ns  # ... and filed as it is now


def test_a_card_is_only_used_on_the_cpu(full, cache, model_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_VISIBLE_DEVICES", "")
        assert cuda_absent()
        mp.setenv("CUDA_VISIBLE_DEVICES", "-1")
        assert cuda_absent()
    qm = load_query_model(str(model_dir), device="cpu", runtime="torch", lm=None)
    assert qm.runtime == "torch" and qm.lm.model is not None  # asked for PyTorch: the full load, no card


def test_tokenizers_alone_gives_transformers_ids(lm):
    assert direct_tokenizer_agrees(lm)
    direct = DirectTokenizer(lm.path, lm.pad_id)
    texts = tokenizer_probe(16)
    for n in (16, 256):
        want = lm.tokenizer(texts, truncation=True, max_length=n, verbose=False)["input_ids"]
        got = direct(texts, truncation=True, max_length=n)["input_ids"]
        assert [list(r) for r in want] == got
        assert max(len(r) for r in got) == n  # the long texts were cut, special tokens kept
    assert direct.pad_token_id == lm.tokenizer.pad_token_id


def test_a_model_loaded_from_its_card_refuses_pytorch_work(full, cache, model_dir):
    from shoal.workers.query_model import _from_card

    qm = _from_card(str(model_dir), 256, 1, "auto", "cpu")
    assert qm is not None and qm.lm.model is None
    with pytest.raises(RuntimeError, match="ONNX Runtime queries only"):
        encode(["wing flutter"], qm.lm)  # an error, never the null embedder's random vectors
    assert encode([], qm.lm).shape == (0, 384)
    null = load_model("null:8")
    assert encode(["a", "b"], null).shape == (2, 8)  # the null embedder still needs no weights
