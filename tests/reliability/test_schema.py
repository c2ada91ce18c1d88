"""The OpenAPI schema is the contract: schemathesis (`st run --checks all`) against a served index finds nothing.

Bounded: a fixed seed, deterministic generation, a cap on examples and time; loopback only.
"""

import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from shoal.cluster.app import AppArgs, build_app, config_to_dict
from shoal.cluster.ingest import ingest

from conftest import ROOT, cranfield_docs, wait_healthy, write_docs

PORT = 18533
URL = f"http://127.0.0.1:{PORT}"
QUIET = {"log_level": "WARNING", "enable_access_log": False}


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_local):
    from ray import serve

    from shoal.cluster.config import load_config

    tmp = tmp_path_factory.mktemp("schema")
    write_docs(cranfield_docs(20), tmp / "docs")
    cfg = load_config(ROOT / "configs" / "test.yaml", data_dir=str(tmp / "data"))
    # the default body limit (1 MiB) holds any schema-valid body: 8 queries x 4096 characters, escaped
    cfg = replace(cfg, serve=replace(cfg.serve, port=PORT, num_cpus_encoder=0.3, num_cpus_searcher=0.1,
                                     num_cpus_ingress=0.1, max_batch_queries=8))
    ingest([str(tmp / "docs")], cfg, out=lambda s: None)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(AppArgs(cfg=config_to_dict(cfg))), name="shoal", route_prefix="/", logging_config=QUIET)
    wait_healthy(URL)
    yield tmp
    serve.delete("shoal")
    serve.shutdown()


def test_schemathesis_finds_no_failure(served):
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is a test extra: scripts/setup.sh test installs it"
    r = subprocess.run(
        [st, "run", f"{URL}/openapi.json", "--checks", "all", "--seed", "20261128", "--generation-deterministic",
         "--max-examples", "15", "--max-time", "40", "--workers", "1", "--request-timeout", "60",
         "--no-color", "--report", "junit", "--report-junit-path", str(served / "st.xml")],
        capture_output=True, text=True, timeout=420, cwd=served)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]  # schemathesis exits non-zero on any failure
    assert re.search(r"Test cases:\s+\d+ generated", out), out[-3000:]  # and it did run cases
