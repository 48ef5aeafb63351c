"""The seen-addresses table: duplicate detection and resume prefilters in bounded memory.

One 8-byte digest and one line number per address in flat arrays, spilled to a
private temporary SQLite file past a quarter of a million addresses, so that a list
of millions is checked for duplicates with flat memory.
"""

from __future__ import annotations

import hashlib
import sqlite3
from array import array

__all__ = ["SeenAddresses"]


class SeenAddresses:
    """A set of addresses that remembers where each was first seen, in bounded memory.

    Stores an 8-byte BLAKE2 digest and a 4-byte line number per address in two flat
    arrays (open addressing, linear probing), at most half full: 24 bytes an address
    instead of the ~150 a Python set of strings would take. Past ``spill_at``
    addresses (262,144 by default, 6 MB) the table moves into a private temporary
    SQLite database on disk, with a small page cache, so that memory stays flat
    however long the list is (each lookup then costs a few microseconds more). Two
    different addresses share a 64-bit digest with probability about n²/2⁶⁵
    (≈3·10⁻⁸ for a million).
    """

    def __init__(self, capacity: int = 1 << 12, *, spill_at: int = 1 << 18) -> None:
        self._size = capacity
        self._digests = array("Q", [0]) * capacity
        self._lines = array("I", [0]) * capacity
        self._count = 0
        self._spill_at = spill_at
        self._disk: sqlite3.Connection | None = None

    def __len__(self) -> int:
        return self._count

    @staticmethod
    def _digest(key: bytes) -> int:
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") or 1

    def _slot(self, digest: int) -> int:
        """Where the digest is in the table, or the empty slot where it goes."""
        mask = self._size - 1
        slot = digest & mask
        digests = self._digests
        while True:
            found = digests[slot]
            if found == 0 or found == digest:
                return slot
            slot = (slot + 1) & mask

    def add(self, key: bytes, line: int) -> int | None:
        """Remember ``key`` at ``line``; return the earlier line if it was already there."""
        digest = self._digest(key)
        if self._disk is not None:
            signed = digest - (1 << 63)  # SQLite integers are signed 64-bit
            if self._disk.execute(_SPILL_INSERT, (signed, line)).rowcount == 0:
                earlier: int = self._disk.execute(_SPILL_SELECT, (signed,)).fetchone()[0]
                return earlier
            self._count += 1
            return None
        slot = self._slot(digest)
        if self._digests[slot]:
            return self._lines[slot]
        self._digests[slot] = digest
        self._lines[slot] = line
        self._count += 1
        if self._count >= self._spill_at:
            self._spill()
        elif self._count * 2 > self._size:
            self._grow()
        return None

    def get(self, key: bytes) -> int | None:
        """The line remembered for ``key``, or None."""
        digest = self._digest(key)
        if self._disk is not None:
            row = self._disk.execute(_SPILL_SELECT, (digest - (1 << 63),)).fetchone()
            return None if row is None else row[0]
        slot = self._slot(digest)
        return self._lines[slot] if self._digests[slot] else None

    def _spill(self) -> None:
        # "": a private database in a temporary file, deleted when closed.
        disk = sqlite3.connect("", isolation_level=None)
        disk.execute("PRAGMA journal_mode = OFF")
        disk.execute("PRAGMA synchronous = OFF")
        disk.execute("PRAGMA cache_size = -4096")  # 4 MB
        disk.execute("CREATE TABLE seen (digest INTEGER PRIMARY KEY, line INTEGER NOT NULL)")
        disk.execute("BEGIN")  # one transaction for the whole run: nothing to make durable
        disk.executemany(
            "INSERT INTO seen VALUES (?, ?)",
            ((d - (1 << 63), n) for d, n in zip(self._digests, self._lines) if d),
        )
        self._disk = disk
        self._digests = self._lines = array("Q")

    def close(self) -> None:
        """Drop the on-disk part, if any (it also goes with the object)."""
        if self._disk is not None:
            self._disk.close()
            self._disk = None

    def _grow(self) -> None:
        old_digests, old_lines = self._digests, self._lines
        self._size *= 2
        self._digests = array("Q", [0]) * self._size
        self._lines = array("I", [0]) * self._size
        mask = self._size - 1
        for digest, line in zip(old_digests, old_lines):
            if digest:
                slot = digest & mask
                while self._digests[slot]:
                    slot = (slot + 1) & mask
                self._digests[slot] = digest
                self._lines[slot] = line


_SPILL_INSERT = "INSERT INTO seen VALUES (?, ?) ON CONFLICT (digest) DO NOTHING"
_SPILL_SELECT = "SELECT line FROM seen WHERE digest = ?"
