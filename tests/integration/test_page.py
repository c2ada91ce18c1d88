"""The search page and the passage view in a real browser: Debian's chromium driven by Playwright, against
`shoal serve` (run_serve, the function the command runs) on 127.0.0.1.

Chromium comes from Debian's `chromium` package, installed here where it is missing (as root, as in CI);
Playwright's own browser download cannot reach this machine, so it is launched with executable_path. The
test fails, loudly, if either cannot be had. Screenshots go to a temporary folder (printed), not the tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, cranfield_docs, wait_healthy, write_docs

pytestmark = pytest.mark.timeout(900)
PORT = 18467
URL = f"http://127.0.0.1:{PORT}"
HOSTILE = ("Flutter report <script>alert(1)</script> and <img src=x onerror=\"document.title='pwned'\"> "
           "wing flutter flutters here.")


def chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:  # the test's own set-up: Debian's package, as root (CI runs as root)
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True, timeout=300)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
                           capture_output=True, text=True, timeout=900,
                           env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        exe = shutil.which("chromium")
        if exe is None:
            pytest.fail(f"cannot install Debian's chromium package: {r.stderr[-1000:]}")
    return exe


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"playwright is not installed ({e}): pip install playwright (the test extra has it)")
    exe = chromium()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory, ray_local):
    from ray import serve

    from shoal.cluster.app import run_serve
    from shoal.cluster.config import load_config
    from shoal.cluster.ingest import ingest

    tmp = tmp_path_factory.mktemp("page")
    docs = tmp / "docs"
    write_docs(cranfield_docs(40), docs)
    (docs / "hostile.html").write_text(f"<html><body><p>{HOSTILE.replace('<', '&lt;')}</p></body></html>")
    (docs / "hostile.txt").write_text(HOSTILE)
    long = " ".join(f"Section {i}. The flutter of a swept wing at transonic speed was measured in run {i}."
                    for i in range(60))
    (docs / "notes").mkdir()
    (docs / "notes" / "flutter-log.md").write_text("# Flutter log\n\n" + long)  # several chunks that match
    (docs / "victim.txt").write_text("a harmless note about rotor blade flutter, to be swapped for a link")
    cfg = load_config(ROOT / "configs" / "test.yaml", data_dir=str(tmp / "data"))
    cfg = replace(cfg, serve=replace(cfg.serve, port=PORT, num_cpus_searcher=0.1, num_cpus_ingress=0.1,
                                     num_cpus_encoder=0.3, reload_interval_s=0.5))
    ingest([str(docs)], cfg, out=lambda s: None)
    printed: list[str] = []
    run_serve(cfg, detach=True, out=printed.append)
    assert wait_healthy(URL)
    shots = Path(tempfile.mkdtemp(prefix="shoal-page-shots-"))
    print(f"\nscreenshots in {shots}")
    yield {"cfg": cfg, "docs": docs, "tmp": tmp, "printed": printed, "shots": shots}
    serve.shutdown()


def search(page, q: str, **fields: str):
    page.goto(URL + "/")
    page.fill("#q", q)
    for name, value in fields.items():
        page.fill(f"#{name}", value)
    page.press("#q", "Enter")
    page.wait_for_selector("#summary")
    return page


def test_serve_prints_the_page_address(site):
    assert any(f"search page: {URL}/" in line for line in site["printed"]), site["printed"]


def test_query_enter_files_snippets_highlights(site, browser):
    page = browser.new_page()
    search(page, "wing flutter")
    hits = page.locator("#results > li article.hit")
    assert hits.count() == 10
    paths = [hits.nth(i).locator("h2 a").inner_text() for i in range(hits.count())]
    assert len(set(paths)) == len(paths)  # files, not repeated chunks
    marks = [m.lower() for m in page.locator("#results mark").all_inner_texts()]
    assert "flutter" in marks and any(m.startswith("flutter") and m != "flutter" or m == "wing" for m in marks), marks
    assert "score in [0, 1]" in page.inner_text("#summary")  # the mode's scale, said once
    status = page.inner_text("#status")
    assert "generation 000001" in status and "files" in status and "shard group #0 up" in status, status
    page.screenshot(path=str(site["shots"] / "results.png"), full_page=True)
    # a file with several matching chunks: counted once, its other passages behind "n more passages"
    log = page.locator("article.hit", has=page.locator("a", has_text="flutter-log.md"))
    assert log.count() == 1
    summary = log.locator("details summary")
    assert "more passage" in summary.inner_text()
    n_more = int(summary.inner_text().split()[0])
    assert n_more >= 2 and not log.locator("ol.passages").is_visible()
    summary.click()
    assert log.locator("ol.passages > li").count() == n_more and log.locator("ol.passages").is_visible()
    page.close()


def test_passage_view_shows_the_query_words_in_the_file(site, browser):
    page = browser.new_page()
    search(page, "wing flutter")
    first = page.locator("#results article.hit h2 a").first
    path = first.inner_text()
    first.click()
    page.wait_for_selector("pre.context")
    assert page.inner_text("h1.path") == path
    assert page.locator("#passage").count() == 1
    words = [m.lower() for m in page.locator("pre.context mark:not(.passage)").all_inner_texts()]
    assert "flutter" in words, words
    meta = page.inner_text("dl.file")
    assert "Size" in meta and "Modified" in meta and "line" in meta
    page.screenshot(path=str(site["shots"] / "passage.png"), full_page=True)
    page.click("#whole")
    page.wait_for_selector("pre.context")
    assert Path(path).read_text(encoding="utf-8").split()[0] in page.inner_text("pre.context")
    page.close()


def test_filters_narrow_the_results(site, browser):
    page = browser.new_page()
    search(page, "flutter", path_prefix=str(site["docs"] / "notes"))
    paths = page.locator("#results article.hit h2 a").all_inner_texts()
    assert paths == [str(site["docs"] / "notes" / "flutter-log.md")]
    page.goto(URL + "/")
    page.fill("#q", "flutter")
    page.check("input[name=file_type][value=html]")
    page.press("#q", "Enter")
    page.wait_for_selector("#summary")
    assert page.locator("#results article.hit h2 a").all_inner_texts() == [str(site["docs"] / "hostile.html")]
    page.close()


def test_a_document_is_shown_as_text_and_nothing_in_it_runs(site, browser):
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    search(page, "flutter report script alert")
    body = page.inner_text("#results")
    assert "<script>alert(1)</script>" in body and "onerror" in body
    assert page.locator("#results script").count() == 0 and page.locator("#results img").count() == 0
    link = page.locator("article.hit h2 a", has_text="hostile.txt")
    link.click()
    page.wait_for_selector("pre.context")
    assert "<script>alert(1)</script>" in page.inner_text("pre.context")
    assert page.locator("main script, main img").count() == 0
    page.wait_for_timeout(300)
    assert not dialogs and page.title() != "pwned"
    page.close()


def test_unknown_or_outside_the_roots_is_a_clear_404_page(site, browser):
    page = browser.new_page()
    r = page.goto(URL + "/passage/987654321")
    assert r.status == 404 and "Not found" in page.inner_text("main") and "no passage 987654321" in \
        page.inner_text("main")
    j = httpx.get(URL + "/passage/987654321", params={"format": "json"})
    assert j.status_code == 404 and "987654321" in j.json()["detail"]
    # a file inside a root swapped for a link to a file outside every root: its passage is not served
    victim = site["docs"] / "victim.txt"
    hit = httpx.get(URL + "/search", params={"q": "harmless note rotor blade", "k": 1}).json()["hits"][0]
    assert hit["path"] == str(victim)
    outside = site["tmp"] / "outside-secret.txt"
    outside.write_text("SECRET that must never be served")
    victim.unlink()
    os.symlink(outside, victim)
    r = page.goto(f"{URL}/passage/{hit['id']}")
    assert r.status == 404 and "inside the ingested roots" in page.inner_text("main")
    assert "SECRET" not in page.content()
    assert httpx.get(f"{URL}/text/{hit['id']}").status_code == 404
    page.close()


def test_keyboard_reaches_box_mode_results_and_links_in_order(site, browser):
    page = browser.new_page()
    search(page, "wing flutter")
    page.focus("#q")
    seen = []
    for _ in range(20):
        seen.append(page.evaluate("() => { const e = document.activeElement; return e.id || e.tagName + ':' + "
                                  "(e.getAttribute('href') || e.className || ''); }"))
        page.keyboard.press("Tab")
    assert seen[0] == "q" and seen[1] == "mode", seen
    first_article = next(i for i, s in enumerate(seen) if s.startswith("ARTICLE"))
    assert seen.index("k") < first_article and seen[first_article + 1].startswith("A:/passage/"), seen
    articles = [i for i, s in enumerate(seen) if s.startswith("ARTICLE")]
    assert len(articles) >= 3 and all(seen[i + 1].startswith("A:/passage/") for i in articles if i + 1 < len(seen)), seen
    page.keyboard.press("Enter")  # on a result's link: the passage view opens
    page.close()


def test_without_javascript_the_plain_form_works(site, browser):
    ctx = browser.new_context(java_script_enabled=False)
    page = ctx.new_page()
    page.goto(URL + "/")
    page.fill("#q", "wing flutter")
    page.press("#q", "Enter")
    page.wait_for_selector("#summary")
    assert "q=wing+flutter" in page.url and page.locator("#results article.hit").count() == 10
    ctx.close()


def test_with_a_token_the_page_asks_for_it_then_works(site, browser):
    from ray import serve

    from shoal.cluster.app import APP, AppArgs, build_app, config_to_dict

    tok = replace(site["cfg"], serve=replace(site["cfg"].serve, token="page-s3cret"))
    serve.run(build_app(AppArgs(cfg=config_to_dict(tok))), name=APP, route_prefix="/",
              logging_config={"log_level": "WARNING", "enable_access_log": False})
    deadline, in_a_row = time.time() + 120, 0
    while time.time() < deadline and in_a_row < 5:  # every replica of the new app answers: the old ones are gone
        in_a_row = in_a_row + 1 if httpx.get(URL + "/search", params={"q": "wing"}).status_code == 401 else 0
        time.sleep(0.2)
    assert in_a_row == 5, "the app with a token did not take over"
    ok = {"authorization": "Bearer page-s3cret"}
    while time.time() < deadline and httpx.get(URL + "/search", params={"q": "wing"}, headers=ok,
                                                timeout=60).status_code != 200:
        time.sleep(0.5)  # the new shard groups are up too: the browser's first search does not wait on them
    try:
        page = browser.new_page()
        r = page.goto(URL + "/?q=wing+flutter")
        assert r.status == 401
        assert "needs a token" in page.inner_text("main") and page.locator("#results").count() == 0
        assert page.locator("#token-refused").count() == 0  # none sent yet: nothing was refused
        page.fill("#token", "wrong")
        page.press("#token", "Enter")
        page.wait_for_selector("#token-refused", timeout=60_000)  # the wrong try's answer has replaced the form
        assert "not accepted" in page.inner_text("main") and page.locator("#results").count() == 0
        assert page.input_value("#token") == "" and page.evaluate("sessionStorage.getItem('shoal-token')") is None
        page.fill("#token", "page-s3cret")
        page.press("#token", "Enter")
        page.wait_for_selector("#summary", timeout=90_000)
        assert page.locator("#results article.hit").count() == 10 and "page-s3cret" not in page.url
        page.locator("#results article.hit h2 a").first.click()  # the passage view, with the kept token
        page.wait_for_selector("pre.context", timeout=90_000)
        assert "page-s3cret" not in page.url
        page.reload()  # kept for the tab: a reload fetches it again with the header
        page.wait_for_selector("pre.context", timeout=90_000)
        page.close()
    finally:
        serve.run(build_app(AppArgs(cfg=config_to_dict(site["cfg"]))), name=APP, route_prefix="/",
                  logging_config={"log_level": "WARNING", "enable_access_log": False})
