
import pytest

from shoal.workers.catalog import Catalog, FileBatch
from shoal.workers.chunking import Chunk
from shoal.index.errors import CorruptFileError
from shoal.workers.scan import Skipped


def fb(path, n, sha="h"):
    return FileBatch(path, "/r", 10, 1, sha, "text", [Chunk(i, i, i + 1, f"c{i}") for i in range(n)])


def test_commit_assigns_increasing_ids_and_never_reuses(tmp_path):
    cat = Catalog(tmp_path / "c.sqlite")
    ids1 = cat.commit_files([fb("/r/a", 3), fb("/r/b", 2)])
    assert ids1.tolist() == [1, 2, 3, 4, 5]
    cat.delete_files(["/r/b"])
    ids2 = cat.commit_files([fb("/r/c", 2)])
    assert ids2.min() > ids1.max()  # AUTOINCREMENT: deleted ids stay dead
    assert cat.chunk_ids().tolist() == [1, 2, 3, 6, 7]
    # re-committing a file replaces its chunks
    ids3 = cat.commit_files([fb("/r/a", 1, sha="h2")])
    assert cat.chunk_ids().tolist() == [6, 7, int(ids3[0])]
    assert cat.file_by_path("/r/a").sha256 == "h2"


def test_failed_part_write_rolls_back_rows(tmp_path):
    cat = Catalog(tmp_path / "c.sqlite")
    cat.commit_files([fb("/r/a", 2)], write_part=lambda ids: "p1")

    def boom(ids):
        raise OSError("disk full")

    with pytest.raises(OSError):
        cat.commit_files([fb("/r/a", 5, sha="new"), fb("/r/b", 1)], write_part=boom)
    assert cat.chunk_ids().tolist() == [1, 2]
    assert cat.file_by_path("/r/a").sha256 == "h"
    assert cat.file_by_path("/r/b") is None
    assert cat.part_names() == ["p1"]


def test_wal_mode_and_lookup(tmp_path):
    cat = Catalog(tmp_path / "c.sqlite")
    assert cat.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    ids = cat.commit_files([fb("/r/a", 2)])
    rows = cat.lookup(ids.tolist() + [999])
    assert set(rows) == set(ids.tolist())
    assert rows[int(ids[1])].path == "/r/a" and rows[int(ids[1])].text == "c1"


def test_files_under_is_by_path_prefix(tmp_path):
    cat = Catalog(tmp_path / "c.sqlite")
    cat.commit_files([fb("/r/a", 1), fb("/r/sub/b", 1), fb("/rx/c", 1)])
    assert set(cat.files_under("/r")) == {"/r/a", "/r/sub/b"}
    assert set(cat.files_under("/r/sub")) == {"/r/sub/b"}


def test_skipped_replaces_indexed_file(tmp_path):
    cat = Catalog(tmp_path / "c.sqlite")
    cat.commit_files([fb("/r/a", 2)])
    cat.record_skipped([Skipped("/r/a", "too-large", "big")], "/r", None)
    assert cat.counts()["chunks"] == 0
    assert cat.skipped_by_reason() == {"too-large": 1}
    cat.clear_skipped("/r")
    assert cat.counts()["skipped"] == 0


def test_runs_detect_interrupted(tmp_path):
    cat = Catalog(tmp_path / "c.sqlite")
    r1, prev = cat.start_run(["/r"])
    assert prev is None
    r2, prev = cat.start_run(["/r"])  # r1 never finished
    assert prev == r1
    cat.finish_run(r2, "done", {"chunks_added": 3})
    assert cat.last_run()["status"] == "done"


def test_damaged_catalog_is_named(tmp_path):
    p = tmp_path / "c.sqlite"
    p.write_bytes(b"not a database at all" * 100)
    with pytest.raises(CorruptFileError, match="c.sqlite"):
        Catalog(p)


def test_path_prefix_filter_is_a_range_that_matches_exactly_the_prefix(tmp_path):
    from shoal.workers.catalog import prefix_upper_bound

    cat = Catalog(tmp_path / "c.sqlite")
    paths = ["/r/a", "/r/a%b", "/r/a_c", "/r/ab", "/r/b", "/r/é/x", "/r/éa", "/r/ê", "/r/\U0001F600/y", "/r0"]
    for p in paths:
        cat.commit_files([FileBatch(p, "/r", 10, 1, "h", "text", [Chunk(0, 0, 1, "c")])])
    for prefix in ["/r/a", "/r/a%", "/r/a_", "/r/é", "/r/\U0001F600", "/r/", "/r", "/", "/r/z", "/r/\U0010FFFF"]:
        want = sorted(int(cat.file_by_path(p).id) for p in paths if p.startswith(prefix))
        got = cat.ids_matching(prefix).tolist()
        assert sorted(cat.lookup(got)[i].path for i in got) == sorted(p for p in paths if p.startswith(prefix)), prefix
        assert len(got) == len(want)
    assert prefix_upper_bound("/r/a") == "/r/b" and prefix_upper_bound("\U0010FFFF") is None
    assert prefix_upper_bound("x\ud7ff") == "x\ue000"
    assert cat.roots() == ["/r"]
