"""A damaged RocksDB table store is found at start and moved aside (pipeline.store_check),
on real rocksdict stores damaged the ways disks and operators damage them."""

from pathlib import Path

import pytest
from rocksdict import Options, Rdict

from incstream.pipeline.store_check import mark_damaged, move_aside_damaged, store_problem


def make_store(path: Path, records: int = 2000) -> None:
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    db = Rdict(str(path), options=options)
    for i in range(records):
        db.put(f"doc-{i}".encode(), f"state {i} ".encode() * 20)
    db.flush()  # into an .sst, as a long-running worker's data is
    db.close()


@pytest.fixture
def tables(tmp_path) -> Path:
    for partition in range(3):
        make_store(tmp_path / f"documents-{partition}.db")
    return tmp_path


def flip_bytes_in_an_sst(store: Path) -> None:
    (sst,) = store.glob("*.sst")
    data = bytearray(sst.read_bytes())
    for i in range(200, 260):
        data[i] ^= 0xFF
    sst.write_bytes(bytes(data))


def test_sound_stores_are_left_alone(tables):
    assert store_problem(tables / "documents-0.db") is None
    assert move_aside_damaged(tables, "documents") == []
    assert sorted(p.name for p in tables.iterdir()) == [f"documents-{p}.db" for p in range(3)]


def test_current_naming_a_missing_manifest_is_moved_aside(tables):
    (tables / "documents-1.db" / "CURRENT").write_text("MANIFEST-999999\n")
    assert "MANIFEST-999999" in store_problem(tables / "documents-1.db")
    (aside,) = move_aside_damaged(tables, "documents")
    assert aside.name.startswith("documents-1.db.damaged-") and aside.is_dir()
    assert not (tables / "documents-1.db").exists()
    assert store_problem(tables / "documents-0.db") is None  # the others stay


def test_flipped_bytes_in_an_sst_are_found_by_the_full_read(tables):
    """Opening such a store succeeds and a plain iteration just stops early: only the
    iterator's status tells the read was cut short by a checksum mismatch."""
    flip_bytes_in_an_sst(tables / "documents-2.db")
    assert "Corruption" in store_problem(tables / "documents-2.db")
    (aside,) = move_aside_damaged(tables, "documents")
    assert aside.name.startswith("documents-2.db.damaged-")


def test_a_store_marked_by_a_crashed_worker_is_moved_aside_even_if_it_reads(tables):
    mark_damaged(tables / "documents-0.db", "Corruption: block checksum mismatch")
    (aside,) = move_aside_damaged(tables, "documents")
    assert aside.name.startswith("documents-0.db.damaged-")
    assert not (tables / "documents-0.db.damaged").exists(), "the marker is consumed"
    assert move_aside_damaged(tables, "documents") == []


def test_a_store_open_in_another_process_is_not_taken_for_damaged(tables):
    held = Rdict(str(tables / "documents-0.db"), options=Options(raw_mode=True))
    try:
        assert move_aside_damaged(tables, "documents") == []
    finally:
        held.close()
