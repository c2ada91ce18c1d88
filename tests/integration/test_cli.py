"""The `shoal` command as a user runs it: real subprocesses, exit codes, output."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, cranfield_docs, write_docs

SHOAL = [sys.executable, "-m", "cluster.cli"]


def run(*args, data_dir=None, input=None, timeout=300):
    env = dict(os.environ)
    env.pop("SHOAL_DATA_DIR", None)
    cmd = [*SHOAL, *args]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    return subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    paths = write_docs(cranfield_docs(30), tmp / "docs")
    (tmp / "docs" / "junk.png").write_bytes(b"\x89PNG")
    r = run("ingest", str(tmp / "docs"), "--config", "configs/test.yaml", data_dir=tmp / "data")
    assert r.returncode == 0, r.stderr
    assert "30 new" in r.stdout and "binary 1" in r.stdout
    return tmp / "data", paths


def test_query_json_and_text(ingested):
    data, paths = ingested
    r = run("query", "wing in a propeller slipstream spanwise lift", "-k", "3", "--json", data_dir=data)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["hits"]) == 3 and out["hits"][0]["path"] == str(paths["1"])
    assert len(out["hits"][0]["text"]) <= 201
    r = run("query", "wing in a propeller slipstream", "-k", "2", "--full", data_dir=data)
    assert r.returncode == 0 and str(paths["1"]) in r.stdout.splitlines()[0]


def test_interactive_search_until_exit(ingested):
    data, paths = ingested
    r = run("search", "-k", "2", data_dir=data,
            input="wing in a propeller slipstream\n\n   \nheat transfer in a laminar boundary layer\nexit\nnever run\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("hits in") == 2
    assert str(paths["1"]) in r.stdout
    r = run("search", data_dir=data, input="slipstream\n")  # Ctrl-D (EOF) ends it too
    assert r.returncode == 0 and r.stdout.count("hits in") == 1


def test_status(ingested):
    data, _ = ingested
    r = run("status", "--json", "--skipped", data_dir=data)
    st = json.loads(r.stdout)
    assert st["generation"] == "000001" and st["counts"]["files"] == 30
    assert st["skipped"][0]["reason"] == "binary"
    assert st["model"]["name"] == "all-MiniLM-L6-v2" and st["model"]["fingerprint"].startswith("sha256:")
    assert st["device"]["embedding"] in ("cpu", "cuda")
    r = run("status", data_dir=data)
    assert "generation:  000001" in r.stdout and "skipped:     binary 1" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (("query", "anything"), "no index yet"),
    (("ingest", "/no/such/path"), "path not found: /no/such/path"),
    (("query", "x", "--config", "/no/such.yaml"), "config file not found"),
    (("query", "x", "-k", "0"), "k must be from 1 to 1000"),
])
def test_errors_exit_2_without_traceback(tmp_path, args, needle):
    r = run(*args, data_dir=tmp_path / "empty")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_empty_query_and_bad_config(ingested, tmp_path):
    data, _ = ingested
    r = run("query", "   ", data_dir=data)
    assert r.returncode == 2 and "empty query" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("index:\n  nprobe: lots\n")
    r = run("query", "x", "--config", str(bad), data_dir=data)
    assert r.returncode == 2 and "index.nprobe" in r.stderr and "lots" in r.stderr
