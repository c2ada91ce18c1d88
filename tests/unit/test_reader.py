"""Read tasks on Ray hand back exactly what the driver would read itself, in submission order."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.workers.reader import ChunkSpec, ReadPool, auto_workers, prepare_files

from conftest import cranfield_docs

SPEC = ChunkSpec("all-MiniLM-L6-v2", False, 64, 8, 20 << 20)


def write_pdf(path, paragraphs):
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("helvetica", size=11)
    for i, text in enumerate(paragraphs):
        if i % 3 == 0:
            pdf.add_page()
        pdf.multi_cell(0, 6, text.encode("latin-1", "replace").decode("latin-1"), new_x="LMARGIN", new_y="NEXT")
    pdf.output(str(path))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("reader")
    docs = cranfield_docs(40)
    paths = []
    for i, doc in enumerate(docs):
        if i % 5 == 0:  # slow files early and often: later tasks finish first unless order is kept
            p = d / f"{i:03d}.pdf"
            write_pdf(p, [doc["text"]] * 3)
        else:
            p = d / f"{i:03d}.txt"
            p.write_text(doc["title"] + "\n\n" + doc["text"])
        paths.append(p)
    (d / "bad.txt").write_bytes(b"\x00\x01garbage" * 10)
    (d / "latin.txt").write_bytes(b"caf\xe9 au lait")
    (d / "empty.md").write_text("   \n")
    (d / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    return sorted(d.iterdir())


def test_tasks_return_in_submission_order_what_the_driver_reads(files, ray_local):
    local = ReadPool(SPEC, workers=0)
    remote = ReadPool(SPEC, workers=2, batch_files=3)
    for p in files:
        for pool in (local, remote):
            pool.submit(str(p), None, p.stat().st_size)
    a = list(local.results(block=True))
    b = list(remote.results(block=True))
    assert [x.path for x in b] == [str(p) for p in files]
    assert remote.tasks == -(-len(files) // 3)
    for x, y in zip(a, b):
        assert (x.path, x.digest, x.kind, x.skip, x.same) == (y.path, y.digest, y.kind, y.skip, y.same)
        assert x.chunks == y.chunks
        if x.chunks:  # each chunk's input ids travel with it, [CLS] ... [SEP]
            assert len(y.tokens) == len(y.chunks) and (x.tokens.ids == y.tokens.ids).all()
            assert (y.tokens.ids[y.tokens.offsets[:-1]] == 101).all()
    pdfs = [x for x in b if x.path.endswith("0.pdf") or x.path.endswith("5.pdf")]
    assert len(pdfs) == 8 and all(x.chunks and x.kind == "pdf" for x in pdfs)
    skipped = {x.path.rsplit("/", 1)[1]: x.skip[0] for x in b if x.skip}
    assert skipped == {"bad.txt": "binary", "empty.md": "empty", "broken.pdf": "bad-pdf", "latin.txt": "undecodable"}
    assert remote.task_seconds > 0


def test_unchanged_bytes_are_not_chunked(files):
    p = next(f for f in files if f.suffix == ".txt" and f.name != "bad.txt")
    first = prepare_files([(str(p), None)], SPEC)[0]
    again = prepare_files([(str(p), first.digest)], SPEC)[0]
    assert again.same and again.chunks is None and again.digest == first.digest


def test_nonblocking_results_never_skip_ahead(files, ray_local):
    pool = ReadPool(SPEC, workers=2, batch_files=1)
    got = []
    for p in files:
        pool.submit(str(p), None, p.stat().st_size)
        got += [x.path for x in pool.results()]
    got += [x.path for x in pool.results(block=True)]
    assert got == [str(p) for p in files]
    assert len(pool.inflight) == 0


def test_auto_workers(ray_local):
    cpus = int(ray_local.cluster_resources()["CPU"])
    assert auto_workers(-1, 1.0) == max(1, cpus - 1)
    assert auto_workers(-1, 64.0) == 1
    assert auto_workers(3, 1.0) == 3
    assert np.isfinite(cpus)


def test_readers_nice_only_their_own_thread():
    """The reader's work runs niced in a thread of its own: the worker's main thread, which Ray may
    later hand an embedding actor, keeps its priority (os.nice there once left actors niced for good)."""
    import os
    import threading

    from shoal.workers.reader import niced_call

    def prio():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = prio()
    assert niced_call(prio, 5) == min(before + 5, 19)
    assert prio() == before
    assert niced_call(prio, 0) == before
    with pytest.raises(ZeroDivisionError):  # an error in the reader reaches the caller
        niced_call(lambda: 1 / 0, 5)


def test_a_file_written_or_replaced_while_read_is_in_motion_not_half_read(tmp_path):
    """A writer appends while the reader reads a large file: the read is refused as in motion (the
    committed version is kept); a file renamed over mid-read is refused as replaced; a quiet one reads."""
    import os
    import threading

    from shoal.workers.scan import IN_MOTION, SkipFile, read_bytes_stable

    path = tmp_path / "log.txt"
    path.write_text("steady line about gas dynamics\n" * 400_000)  # ~12 MB: the read takes a while
    data, st = read_bytes_stable(str(path), 20 << 20)
    assert len(data) == st.st_size  # quiet: read whole
    done = threading.Event()

    def append():
        with open(path, "a") as f:
            while not done.is_set():
                f.write("another line\n")
                f.flush()

    t = threading.Thread(target=append)
    t.start()
    try:
        reasons = set()
        for _ in range(5):
            try:
                read_bytes_stable(str(path), 20 << 20)
            except SkipFile as e:
                reasons.add(e.reason)
        [p] = prepare_files([(str(path), None)], SPEC)
    finally:
        done.set()
        t.join()
    assert reasons == {"changed-while-read"} and p.skip is not None and p.skip[0] in IN_MOTION
    # replaced: other files renamed over its name again and again (as an editor's save does) while it is read
    x, y = tmp_path / "x.bak", tmp_path / "y.bak"
    os.link(path, x)
    y.write_text("another version of the file\n" * 400_000)
    done.clear()

    def swap():
        while not done.is_set():
            for src in (y, x):
                tmp = tmp_path / "swap.tmp"
                os.link(src, tmp)
                os.replace(tmp, path)

    t = threading.Thread(target=swap)
    t.start()
    try:
        seen = set()
        for _ in range(20):
            try:
                read_bytes_stable(str(path), 40 << 20)
            except SkipFile as e:
                seen.add(e.reason)
    finally:
        done.set()
        t.join()
    assert seen == {"replaced-while-read"}
