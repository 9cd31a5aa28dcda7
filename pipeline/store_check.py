"""A damaged local table store is moved aside and rebuilt from the changelog, never crash-looped.

The RocksDB directories under Faust's table dir (`<table>-<partition>.db`) are a cache of the
table's changelog topic: Faust fills a partition's store from the changelog when it has none
(or from the offset it last persisted). So a store that cannot be opened (CURRENT naming a
missing MANIFEST, a lost file) or whose records do not read back (a flipped byte in an .sst:
a block checksum mismatch) is renamed `<name>.damaged-<UTC time>` before Faust opens it, and
Faust rebuilds that partition from the changelog. The worker checks every store this way at
start, and when it meets a corruption while running it leaves a marker next to the store and
exits (`mark_damaged`), so that its restart moves that store aside even if the full read
would not have tripped on the damage.

Runs before the app opens any store (Faust opens them lazily, on partition assignment).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rocksdict import Options, Rdict

log = logging.getLogger("incstream.store")

MARKER_SUFFIX = ".damaged"  # <store>.db.damaged: a running worker met a corruption in it


def store_problem(path: Path) -> str | None:
    """Why the RocksDB store at `path` cannot be used, or None when it opens and every record
    reads back with valid block checksums (a full scan: the cost grows with the store)."""
    options = Options(raw_mode=True)  # as Faust opens it (rocksdict, raw bytes)
    options.create_if_missing(False)
    try:
        db = Rdict(str(path), options=options)
    except Exception as exc:  # rocksdict raises a bare Exception("IO error: ...")
        return str(exc)
    try:
        records = db.iter()
        records.seek_to_first()
        while records.valid():
            records.next()
        # An iterator stops early on a bad block; only its status says it did not finish.
        records.status()
        del records
        return None
    except Exception as exc:
        return str(exc)
    finally:
        db.close()


def is_corruption(exc: BaseException) -> bool:
    """A RocksDB error that says the store's data is damaged (not a lock, not a busy store)."""
    return "Corruption" in str(exc)


def mark_damaged(store: Path, why: str) -> None:
    """Ask the next start to move `store` aside, whatever its scan finds."""
    store.with_name(store.name + MARKER_SUFFIX).write_text(why + "\n", encoding="utf-8")


def move_aside_damaged(table_dir: Path, table: str) -> list[Path]:
    """Check every partition store of `table` under `table_dir`; move the damaged ones aside.
    Returns where they went (empty: all sound). A store locked by another process is left
    alone: Faust waits for such a lock itself."""
    moved = []
    for store in sorted(table_dir.glob(f"{table}-*.db")):
        marker = store.with_name(store.name + MARKER_SUFFIX)
        if marker.exists():
            problem = "a running worker met a corruption: " + marker.read_text("utf-8").strip()
        else:
            problem = store_problem(store)
            # "IO error: While lock file: <store>/LOCK: Resource temporarily unavailable"
            # (not "block checksum mismatch", which has "lock" in it too)
            if problem is not None and "/LOCK:" in problem:
                log.warning("table store %s is locked by another process; not checked", store)
                continue
        if problem is None:
            continue
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = store.with_name(f"{store.name}.damaged-{stamp}")
        store.rename(aside)
        marker.unlink(missing_ok=True)
        log.error("table store %s is damaged (%s); moved it to %s, the partition is rebuilt "
                  "from the changelog", store, problem, aside)
        moved.append(aside)
    return moved
