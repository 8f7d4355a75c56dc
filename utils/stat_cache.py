"""Facts about files, cached in an SQLite file and valid while the file is unchanged.

    cache = StatCache.open("logs/.cache/image_hashes.sqlite", "header_checks", ["reason"], version=1)
    stats = [file_stat(path) for path in paths]
    rows = cache.lookup(paths, stats)            # per path: (reason,) or None (unknown or changed)
    cache.store([(path, stat, (reason,)), ...])
    cache.close()

One table per kind of fact, keyed by absolute path; an entry counts only while the file's mtime
(ns) and size and the table's `version` still match, so an edited or replaced file is checked
again. The image fingerprints of utils.image_hash and the pre-scan's header checks of
utils.data live in LOG_DIR/.cache/image_hashes.sqlite this way. A cache that cannot be used
(read-only folder, damaged file, locked too long) only costs speed: it warns and the caller goes on.

The file stays bounded however many datasets pass through it: once a table holds more than
MAX_ROWS entries, `store` drops those of files that are gone, then the longest unwritten ones,
down to PRUNED_ROWS. A dropped entry only means that file is read again the next time.
"""

from __future__ import annotations

import os
import re
import sqlite3
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

CACHE_TIMEOUT_S = 10.0  # wait this long for another process's write lock on the cache, then go on without it
QUERY_CHUNK = 500  # keys per query: SQLite caps the number of parameters of one query
Stat = tuple[int, int]  # (mtime_ns, size)
MAX_ROWS = 1_000_000  # entries per table before store() prunes (about 150 MB for the fingerprints)
PRUNED_ROWS = 900_000  # what a prune leaves: the next one comes after 100,000 new entries


def file_stat(path: str | os.PathLike) -> Optional[Stat]:
    """(mtime_ns, size) of a file, or None when it cannot be read."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


class StatCache:
    """One table of an SQLite file: (columns...) per absolute path, for as long as mtime, size and version match."""

    def __init__(self, connection: Optional[sqlite3.Connection], table: str, columns: Sequence[str], version: int,
                 what: str = "cache"):
        self.connection, self.table, self.columns, self.version = connection, table, list(columns), version
        self.what = what  # how warnings name it: "hash cache", "header-check cache"
        self.max_rows, self.pruned_rows = MAX_ROWS, PRUNED_ROWS

    @classmethod
    def open(cls, path: str | os.PathLike, table: str, columns: Sequence[str], version: int,
             what: str = "cache") -> StatCache:
        if not all(re.fullmatch(r"[a-z_][a-z0-9_]*", name) for name in [table, *columns]):
            raise ValueError(f"table and column names must be lower-case words: {table}, {columns}")
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(str(path), timeout=CACHE_TIMEOUT_S)
            connection.execute(f"CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, mtime_ns INTEGER, "
                               f"size INTEGER, version INTEGER, {', '.join(columns)})")
            return cls(connection, table, columns, version, what)
        except (OSError, sqlite3.Error) as error:
            warnings.warn(f"{what} {path} not used ({error}); every file is read again", stacklevel=3)
            return cls(None, table, columns, version, what)

    def lookup(self, paths: Sequence[str], stats: Sequence[Optional[Stat]]) -> list[Optional[tuple]]:
        """The cached columns of each path, or None where there is no entry or the file changed."""
        if self.connection is None:
            return [None] * len(paths)
        keys = [os.path.abspath(path) for path in paths]
        try:
            rows = self._rows(keys)
        except sqlite3.Error as error:
            self._give_up(error)
            return [None] * len(paths)
        result: list[Optional[tuple]] = []
        for key, stat in zip(keys, stats):
            row = rows.get(key)
            fresh = row is not None and stat is not None and row[:3] == (*stat, self.version)
            result.append(row[3:] if fresh else None)  # type: ignore[index]
        return result

    def _rows(self, keys: Sequence[str]) -> dict[str, tuple]:
        """{key: (mtime_ns, size, version, *columns)}, asked in chunks, so a cache shared by many
        datasets is never read whole."""
        rows = {}
        for start in range(0, len(keys), QUERY_CHUNK):
            chunk = keys[start:start + QUERY_CHUNK]
            query = (f"SELECT key, mtime_ns, size, version, {', '.join(self.columns)} FROM {self.table} "
                     f"WHERE key IN ({', '.join('?' * len(chunk))})")
            for key, *values in self.connection.execute(query, chunk):  # type: ignore[union-attr]
                rows[key] = tuple(values)
        return rows

    def store(self, entries: Sequence[tuple[str, Stat, Sequence]]) -> None:
        """Add or replace (path, (mtime_ns, size), column values) entries, all in one transaction."""
        if self.connection is None or not entries:
            return
        rows = [(os.path.abspath(path), *stat, self.version, *values) for path, stat, values in entries]
        marks = ", ".join("?" * (4 + len(self.columns)))
        try:
            with self.connection:  # one transaction: all entries or none
                self.connection.executemany(f"INSERT OR REPLACE INTO {self.table} VALUES ({marks})", rows)
            self._prune()
        except sqlite3.Error as error:
            self._give_up(error)

    def _prune(self) -> None:
        """Over max_rows entries: drop those of files that no longer exist, then, if still over, the
        longest unwritten (INSERT OR REPLACE gives a rewritten entry a new, highest rowid)."""
        count = self.connection.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0]  # type: ignore[union-attr]
        if count <= self.max_rows:
            return
        keys = [key for (key,) in self.connection.execute(f"SELECT key FROM {self.table}")]  # type: ignore[union-attr]
        gone = [key for key in keys if not os.path.lexists(key)]
        with self.connection:  # type: ignore[union-attr]
            for start in range(0, len(gone), QUERY_CHUNK):
                chunk = gone[start:start + QUERY_CHUNK]
                self.connection.execute(  # type: ignore[union-attr]
                    f"DELETE FROM {self.table} WHERE key IN ({', '.join('?' * len(chunk))})", chunk)
            excess = count - len(gone) - self.pruned_rows
            if excess > 0:
                self.connection.execute(  # type: ignore[union-attr]
                    f"DELETE FROM {self.table} WHERE rowid IN "
                    f"(SELECT rowid FROM {self.table} ORDER BY rowid LIMIT ?)", (excess,))

    def _give_up(self, error: Exception) -> None:
        warnings.warn(f"{self.what} not used ({error}); every file is read again", stacklevel=3)
        self.close()

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None
