import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ROOT = Path(__file__).resolve().parent.parent
CRANFIELD = ROOT / "tests" / "data" / "cranfield-400"  # a slice carried in the repository (tests/data/README.md)

# tests/gpu runs only from scripts/gpu_check.sh, so CPU runs show no skips for it
collect_ignore = [] if os.environ.get("SHOAL_GPU_CHECK") == "1" else ["gpu"]


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run long soak tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def cranfield_docs(limit: int) -> list[dict]:
    docs = []
    with open(CRANFIELD / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line))
            if len(docs) >= limit:
                break
    return docs


def write_docs(docs: list[dict], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for d in docs:
        p = out / f"{d['_id']}.txt"
        p.write_text(f"{d['title'].strip()}\n\n{d['text'].strip()}\n", encoding="utf-8")
        paths[d["_id"]] = p
    return paths


@pytest.fixture(scope="session")
def lm():
    from shoal.workers.embed import load_model

    return load_model(threads=2)


@pytest.fixture
def test_cfg(tmp_path):
    from shoal.cluster.config import load_config

    cfg = load_config(ROOT / "configs" / "test.yaml")
    return replace(cfg, data_dir=str(tmp_path / "data"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (loopback only) for the whole session."""
    import ray

    from shoal.cluster.ray_env import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def tiny_cross_encoder(out: Path) -> Path:
    """A small AutoModelForSequenceClassification (random weights, the bundled tokenizer), saved to ``out``.

    It tests the re-ranking plumbing; its scores mean nothing.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from shoal.workers.embed import resolve_model_path

    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def wait_healthy(url: str, timeout_s: float = 120) -> bool:
    """Poll GET {url}/healthz until it answers 200 (a served app's replicas are up); False on timeout."""
    import time

    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=10).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False
