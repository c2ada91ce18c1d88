import codecs
import os

import pytest

from shoal.workers.scan import FileEntry, SkipFile, Skipped, html_to_text, read_text, walk


def make_pdf(text: str) -> bytes:
    """A minimal one-page PDF whose page shows ``text`` (hand-built, valid xref)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offs = bytearray(b"%PDF-1.4\n"), []
    for i, o in enumerate(objs, 1):
        offs.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offs)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


@pytest.fixture
def tree(tmp_path):
    r = tmp_path / "root"
    (r / "sub").mkdir(parents=True)
    (r / "a.txt").write_text("hello world")
    (r / "notes.md").write_text("# Title\n\nSome *markdown*.")
    (r / "sub" / "code.py").write_text("def f():\n    return 1\n")
    (r / "page.html").write_text("<html><head><title>T</title><style>x{}</style></head>"
                                 "<body><p>Visible text</p><script>var hidden=1</script></body></html>")
    (r / "doc.pdf").write_bytes(make_pdf("Portable document text"))
    (r / "fake.pdf").write_bytes(b"this is not a pdf")
    (r / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (r / "nul.txt").write_bytes(b"abc\x00def" * 10)
    (r / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (r / "utf16.txt").write_bytes(codecs.BOM_UTF16_LE + "wide text".encode("utf-16-le"))
    (r / "empty.txt").write_bytes(b"")
    (r / "big.txt").write_text("x" * 5000)
    (r / "skip.log").write_text("ignored by glob")
    (r / "node_modules").mkdir()
    (r / "node_modules" / "dep.js").write_text("ignored dir")
    (r / "loop").symlink_to(r, target_is_directory=True)
    (r / "link_in.txt").symlink_to(r / "a.txt")
    outside = tmp_path / "outside.txt"
    outside.write_text("secret outside the roots")
    (r / "link_out.txt").symlink_to(outside)
    (r / "dangling.txt").symlink_to(tmp_path / "nowhere")
    return r


def scan(root, **kw):
    kw.setdefault("ignore", ("node_modules", "*.log"))
    kw.setdefault("max_file_bytes", 4096)
    return {os.path.basename(x.path): x for x in walk([str(root)], **kw)}


def reason_of(root, name, items):
    x = items[name]
    if isinstance(x, Skipped):
        return x.reason
    try:
        read_text(x.path, 4096)
        return "ok"
    except SkipFile as e:
        return e.reason


def test_every_file_is_indexed_or_skipped_with_reason(tree):
    items = scan(tree)
    got = {n: reason_of(tree, n, items) for n in items}
    assert got == {
        "a.txt": "ok", "notes.md": "ok", "code.py": "ok", "page.html": "ok", "doc.pdf": "ok",
        "utf16.txt": "ok", "link_in.txt": "ok",
        "fake.pdf": "bad-pdf", "img.png": "binary", "nul.txt": "binary", "latin1.txt": "undecodable",
        "empty.txt": "empty", "big.txt": "too-large", "loop": "symlink-dir",
        "link_out.txt": "symlink-outside-roots", "dangling.txt": "broken-symlink",
    }


def test_readers_extract_text(tree):
    assert read_text(str(tree / "utf16.txt"))[0] == "wide text"
    text, kind, digest = read_text(str(tree / "page.html"))
    assert kind == "html" and "Visible text" in text and "hidden" not in text and "x{}" not in text
    text, kind, _ = read_text(str(tree / "doc.pdf"))
    assert kind == "pdf" and "Portable document text" in text
    assert read_text(str(tree / "sub" / "code.py"))[1] == "code"
    assert len(digest) == 64


def test_vanished_file(tree):
    with pytest.raises(SkipFile) as e:
        read_text(str(tree / "gone.txt"))
    assert e.value.reason == "vanished"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory")
def test_unreadable_dir(tree):
    d = tree / "locked"
    d.mkdir()
    (d / "f.txt").write_text("x")
    d.chmod(0)
    try:
        items = scan(tree)
        assert items["locked"].reason == "unreadable-dir"
    finally:
        d.chmod(0o755)


def test_follow_symlinks_off(tree):
    items = scan(tree, follow_symlinks=False)
    assert items["link_in.txt"].reason == "symlink"


def test_data_dir_excluded_and_file_root(tree, tmp_path):
    (tree / ".data").mkdir()
    (tree / ".data" / "catalog.txt").write_text("ours")
    items = scan(tree, exclude_dirs=[str(tree / ".data")])
    assert "catalog.txt" not in items
    single = list(walk([str(tree / "a.txt")]))
    assert len(single) == 1 and isinstance(single[0], FileEntry)


def test_html_to_text_keeps_title():
    assert html_to_text("<title>Doc title</title><p>a &amp; b</p>") == "Doc title\na & b"
