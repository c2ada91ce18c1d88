#!/usr/bin/env python3
"""How long the search page takes to show results, in a real browser, beside the JSON API's time.

    python scripts/bench_page.py --data-dir DIR [--queries queries.jsonl] [-n 50]

Starts `shoal serve` on 127.0.0.1 over an ingested DIR, opens the page in headless Chromium (Debian's
`chromium`, driven by Playwright), and for each of the first n queries types it, presses Enter and
waits until the page shows its files (the time a person waits: fetch, render, swap). The same queries
then go to `GET /search?group=file` (the page's JSON twin) with one HTTP client. Prints p50/p90 of
both and their difference.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_serve import DEFAULT_QUERIES, load_queries, start_shoal, stop_server  # noqa: E402


def in_browser(url: str, queries: list[str]) -> list[float]:
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium")
    if exe is None:
        raise SystemExit("bench_page: Debian's chromium is not installed (apt-get install chromium)")
    out = []
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
        page = b.new_page()
        page.goto(url + "/")
        for i, q in enumerate([*queries[:5], *queries]):  # 5 warm-up
            page.fill("#q", q)
            t0 = time.perf_counter()
            page.press("#q", "Enter")
            page.wait_for_function("(q) => { const s = document.getElementById('summary'); "
                                   "return s && s.textContent.includes(q.slice(0, 30)); }", arg=q)
            if i >= 5:
                out.append((time.perf_counter() - t0) * 1000)
        b.close()
    return out


def over_json(url: str, queries: list[str]) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for q in queries[:5]:
            c.get("/search", params={"q": q, "k": 10, "group": "file"})
        for q in queries:
            t0 = time.perf_counter()
            r = c.get("/search", params={"q": q, "k": 10, "group": "file"})
            r.raise_for_status()
            out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--queries", default=str(DEFAULT_QUERIES))
    ap.add_argument("-n", type=int, default=50)
    ap.add_argument("--port", type=int, default=18766)
    a = ap.parse_args()
    queries = [" ".join(q.split()) for q in load_queries(Path(a.queries), a.n)]
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    p = start_shoal(a.data_dir, a.port, log)
    try:
        url = f"http://127.0.0.1:{a.port}"
        page, api = in_browser(url, queries), over_json(url, queries)
    finally:
        stop_server(p)
    print(f"\n### The search page in a browser beside its JSON twin: {len(queries)} queries, k=10 files, hybrid\n")
    print("| path | p50 ms | p90 ms |\n| --- | ---: | ---: |")
    for name, d in (("page: type, Enter, files shown (headless Chromium)", page),
                    ("JSON: GET /search?group=file (httpx)", api)):
        print(f"| {name} | {np.percentile(d, 50):.1f} | {np.percentile(d, 90):.1f} |")
    print(f"\nThe page adds {np.percentile(page, 50) - np.percentile(api, 50):.1f} ms at p50 (fetch of the rendered "
          "page, parse, swap) to the API's answer.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
