"""A server's receipts on disk (issue 23): one SQLite file, the newest signed receipt of each session.

Contract: ``ReceiptStore(path)`` opens (creating) the file; ``put(signed, receipt)`` keeps ``signed`` when
``book.judge`` says it counts against the row held for its (client, server, session), and returns the verdict
(the caller verified the signature first: ``ledger.receipts.verify_receipt``). ``signed_receipts()`` gives every
held receipt as its exact signed bytes, so anyone they are shown to can verify each signature themselves;
``receipts()`` gives the decoded ones for local balances. Rows past ``max_rows`` are refused ("full") rather than
grown without bound. Thread-safe (one lock, one connection); knows nothing of sessions or the network.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from meshinfer.ledger.book import COUNTED, Offer, judge
from meshinfer.wire.receipts import Receipt, SignedReceipt, decode_receipt, decode_signed, encode_signed

DEFAULT_MAX_ROWS = 1_000_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    client TEXT NOT NULL, server TEXT NOT NULL, session TEXT NOT NULL,
    seq INTEGER NOT NULL, tokens INTEGER NOT NULL, blocks INTEGER NOT NULL, model TEXT NOT NULL,
    started REAL NOT NULL, issued REAL NOT NULL, signed BLOB NOT NULL,
    PRIMARY KEY (client, server, session)
)
"""


class ReceiptStore:
    def __init__(self, path: str | Path, *, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._rows = int(self._db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0])

    def put(self, signed: SignedReceipt, receipt: Receipt) -> Offer | str:
        """Keep ``signed`` (whose body is ``receipt``) if it counts; the verdict, or ``"full"``."""
        with self._lock:
            row = self._db.execute("SELECT signed FROM receipts WHERE client=? AND server=? AND session=?",
                                   receipt.key).fetchone()
            held = decode_receipt(decode_signed(row[0]).body) if row else None
            verdict = judge(held, receipt)
            if verdict not in COUNTED:
                return verdict
            if held is None and self._rows >= self.max_rows:
                return "full"
            self._db.execute(
                "INSERT OR REPLACE INTO receipts VALUES (?,?,?,?,?,?,?,?,?,?)",
                (*receipt.key, receipt.seq, receipt.tokens, receipt.blocks, receipt.model, receipt.started,
                 receipt.issued, encode_signed(signed)))
            if held is None:
                self._rows += 1
            return verdict

    def signed_receipts(self, *, limit: int | None = None, after: tuple[str, str, str] | None = None) -> list[bytes]:
        """Held receipts as signed bytes, ordered by (client, server, session), from after ``after``."""
        query = "SELECT signed FROM receipts"
        args: list[object] = []
        if after is not None:
            query += " WHERE (client, server, session) > (?, ?, ?)"
            args.extend(after)
        query += " ORDER BY client, server, session"
        if limit is not None:
            query += " LIMIT ?"
            args.append(limit)
        with self._lock:
            return [bytes(row[0]) for row in self._db.execute(query, args)]

    def used_by_client(self) -> dict[str, int]:
        """Block-tokens each client used here (over the newest receipt of each of its sessions)."""
        with self._lock:
            rows = self._db.execute("SELECT client, SUM(tokens * blocks) FROM receipts GROUP BY client").fetchall()
        return {str(client): int(work) for client, work in rows}

    def receipts(self) -> list[Receipt]:
        return [decode_receipt(decode_signed(blob).body) for blob in self.signed_receipts()]

    def __len__(self) -> int:
        return self._rows

    def close(self) -> None:
        with self._lock:
            self._db.close()
