"""The `shoal` command as a user runs it: real subprocesses, exit codes, output."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, cranfield_docs, write_docs

SHOAL = [sys.executable, "-m", "shoal.cluster.cli"]


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


def test_rerank_needs_a_cross_encoder_then_reorders(ingested, tmp_path):
    from conftest import tiny_cross_encoder

    data, _ = ingested
    r = run("query", "wing in a propeller slipstream", "--rerank", data_dir=data)
    assert r.returncode == 2 and "re-ranking is off" in r.stderr and "Traceback" not in r.stderr
    ce = tiny_cross_encoder(tmp_path / "ce")
    cfg = tmp_path / "rerank.yaml"
    cfg.write_text(f"serve:\n  rerank_model: {ce}\n  rerank_candidates: 8\n")
    r = run("query", "wing in a propeller slipstream", "--rerank", "-k", "8", "--json", "--config", str(cfg),
            data_dir=data)
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)["hits"]
    assert len(hits) == 8 and [h["rank"] for h in hits] == list(range(1, 9))
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_keyword_analysis_change_rebuilds_and_is_recorded(ingested, tmp_path):
    """A new analysis is applied by the next ingest (even with no file changed), never mixed with the old."""
    import shutil

    from shoal.index import generations

    src, _ = ingested
    data = tmp_path / "data"
    shutil.copytree(src, data)
    _, m = generations.open_current(data)
    assert m["keyword"]["analysis"] == {"stemmer": "english", "stopwords": "en"}
    cfg = tmp_path / "plain.yaml"
    cfg.write_text("index:\n  keyword_language: none\n")
    docs = json.loads(run("status", "--json", data_dir=data).stdout)["roots"][0]
    r = run("ingest", docs, "--config", str(cfg), data_dir=data)
    assert r.returncode == 0, r.stderr
    _, m2 = generations.open_current(data)
    assert m2["generation"] != m["generation"] and m2["keyword"]["analysis"] == {"stemmer": None, "stopwords": None}
    r = run("query", "the", "--mode", "keyword", "--json", "--config", str(cfg), data_dir=data)
    assert r.returncode == 0 and json.loads(r.stdout)["hits"]  # no stop words now: "the" matches
    bad = tmp_path / "bad.yaml"
    bad.write_text("index:\n  keyword_language: klingon\n")
    r = run("query", "x", "--config", str(bad), data_dir=data)
    assert r.returncode == 2 and "index.keyword_language" in r.stderr and "klingon" in r.stderr


def test_search_open_full_more_under_a_pty(ingested, tmp_path):
    """`shoal search` on a real pseudo-terminal: full N, more, open N (a stub $EDITOR records its arguments)."""
    import pty
    import select

    data, paths = ingested
    rec = tmp_path / "editor.args"
    stub = tmp_path / "editor.py"
    stub.write_text(f"import json, sys\nopen({str(rec)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    env = dict(os.environ, EDITOR=f"{sys.executable} {stub}")
    env.pop("SHOAL_DATA_DIR", None)
    pid, fd = pty.fork()
    if pid == 0:  # the child: shoal search on the pty
        os.chdir(ROOT)
        os.execve(sys.executable, [*SHOAL, "search", "-k", "2", "--data-dir", str(data)], env)
    buf = b""

    def until(needle: bytes, timeout: float = 120) -> str:
        nonlocal buf
        end = time.time() + timeout
        while needle not in buf:
            assert time.time() < end, f"no {needle!r} in {buf[-2000:]!r}"
            if select.select([fd], [], [], 1)[0]:
                buf += os.read(fd, 65536)
        out, buf = buf[:buf.index(needle) + len(needle)], buf[buf.index(needle) + len(needle):]
        return out.decode("utf-8", "replace")

    def say(line: str, wait: bytes = b"shoal> ") -> str:
        os.write(fd, line.encode() + b"\n")
        return until(wait)

    try:
        until(b"shoal> ")
        shown = say("wing in a propeller slipstream")
        assert "hits in" in shown and str(paths["1"]) in shown
        first_text = paths["1"].read_text(encoding="utf-8")
        out = say("full 1")
        assert " ".join(first_text.split()[:12]) in " ".join(out.split())  # the whole chunk, not a snippet
        out = say("more")
        assert "\r\n  3  " in out and "\r\n  4  " in out  # the next k hits, numbered on
        out = say("open 1")
        args = json.loads(rec.read_text().splitlines()[-1])
        assert args == ["+1", str(paths["1"])]  # hit 1 starts at the top of its file
        out = say("open 9")
        assert "no hit 9: the hits shown are 1 to 4" in out
        os.write(fd, b"exit\n")
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
    finally:
        os.close(fd)
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
