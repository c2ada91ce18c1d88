"""Hostile files and configs: each is indexed or skipped with its reason; the run finishes."""

import codecs
import os
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import yaml

from shoal.workers.catalog import Catalog
from shoal.cluster.config import Config
from shoal.cluster.ingest import ingest
from shoal.workers.scan import SkipFile, read_text, walk


def test_hostile_files_end_indexed_or_skipped(tmp_path, test_cfg, ray_local):
    r = tmp_path / "root"
    r.mkdir()
    (r / "zero.txt").write_bytes(b"")
    (r / "one_word_million_lines.txt").write_text("shoal\n" * 1_000_000)
    (r / "invalid_utf8.txt").write_bytes(b"valid start \xc3\x28 invalid \xff\xfe")
    (r / "utf16_bom.txt").write_bytes(codecs.BOM_UTF16_LE + "wide text about turbulence".encode("utf-16-le"))
    (r / "nul_bytes.txt").write_bytes(b"text\x00with\x00nuls" * 50)
    (r / "not_a.pdf").write_bytes(b"<html>this is not a pdf</html>")
    (r / "loop").symlink_to(r, target_is_directory=True)
    (r / "name\nwith newline.md").write_text("# newline in the name\n\nsupersonic flutter of panels")
    bad_name = os.fsencode(str(r)) + b"/bad\xffname.txt"
    with open(bad_name, "wb") as f:
        f.write(b"a file whose name is not UTF-8")
    (r / "good.txt").write_text("laminar boundary layer heat transfer")
    locked = r / "locked"
    locked.mkdir()
    (locked / "inside.txt").write_text("x")
    locked.chmod(0)
    try:
        rep = ingest([str(r)], test_cfg, out=lambda s: None)
    finally:
        locked.chmod(0o755)
    with Catalog(test_cfg.data_path / "catalog.sqlite") as cat:
        indexed = {Path(p).name for p in cat.files_under(str(r.resolve()))}
        skipped = {Path(s.path).name: s.reason for s in cat.skipped()}
    assert {"good.txt", "utf16_bom.txt", "one_word_million_lines.txt", "name\nwith newline.md"} <= indexed
    assert skipped["zero.txt"] == "empty"
    assert skipped["invalid_utf8.txt"] == "undecodable"
    assert skipped["nul_bytes.txt"] == "binary"
    assert skipped["not_a.pdf"] == "bad-pdf"
    assert skipped["loop"] == "symlink-dir"
    assert skipped["bad\\xffname.txt"] == "undecodable-name"
    if os.geteuid() != 0:
        assert skipped["locked"] == "unreadable-dir"
    else:  # root reads everything: the file inside is indexed
        assert "inside.txt" in indexed
    assert rep.generation is not None


def test_file_vanishing_between_scan_and_read(tmp_path):
    (tmp_path / "a.txt").write_text("here now")
    [entry] = list(walk([str(tmp_path)]))
    os.unlink(entry.path)
    with pytest.raises(SkipFile) as e:
        read_text(entry.path)
    assert e.value.reason == "vanished"


def _wrong_values(cls, prefix=""):
    """(dotted key, wrong value) for every config key: a type it cannot take."""
    import typing

    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if is_dataclass(tp):
            yield key, "not a mapping"
            yield from _wrong_values(tp, key + ".")
            continue
        origin = typing.get_origin(tp)
        if tp is bool:
            yield key, "yes please"
        elif tp in (int, float):
            yield key, "many"
        elif origin is tuple:
            yield key, {"a": 1}
        else:
            yield key, [1, 2]


CASES = list(_wrong_values(Config))


@pytest.mark.parametrize("key,value", CASES, ids=[k for k, _ in CASES])
def test_every_key_with_a_wrong_type_exits_2_naming_it(tmp_path, capsys, key, value):
    from shoal.cluster.cli import main

    doc: dict = {}
    node = doc
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    extra = [] if key == "data_dir" else ["--data-dir", str(tmp_path / "d")]  # --data-dir would override it
    assert main(["status", "--config", str(cfg), *extra]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err


@pytest.mark.parametrize("key,value", [
    ("chunk.tokens", 0), ("chunk.overlap_tokens", -1), ("index.nprobe", 0), ("serve.port", 70000),
    ("index.gpu_reserve_fraction", 1.5), ("index.retrain_growth", 1.0), ("serve.max_batch_size", 0),
    ("query.rrf_k", 0), ("scan.max_file_bytes", "0"), ("index.gpus", [{"name": "a", "memory": "0"}]),
])
def test_out_of_range_values_exit_2(tmp_path, capsys, key, value):
    from shoal.cluster.cli import main

    sec, k = key.split(".")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({sec: {k: value}}))
    assert main(["status", "--config", str(cfg), "--data-dir", str(tmp_path / "d")]) == 2
    assert key.split(".")[0] in capsys.readouterr().err
