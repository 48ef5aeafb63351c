"""The send log's schema: its versions and the forward migrations between them.

The schema has a version (``PRAGMA user_version``) and migrates forward through
:data:`MIGRATIONS`; to change the schema, append a step.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..core.addresses import address_key
from ..core.errors import SendLogError
from ..core.tokens import recipient_tag

__all__ = ["APPLICATION_ID", "MIGRATIONS", "PG_MIGRATIONS", "SCHEMA_VERSION", "migrate"]


# "MLR1": marks the file as a mailer send log (``PRAGMA application_id``).
APPLICATION_ID = 0x4D4C5231

# Each step takes the schema from version N to N + 1 and runs in the same transaction
# as the ``user_version`` update. Never edit a released step; append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: deliveries, runs, suppressions.
    (
        f"PRAGMA application_id = {APPLICATION_ID}",
        """
        CREATE TABLE deliveries (
            campaign    TEXT NOT NULL,
            recipient   TEXT NOT NULL,   -- normalize_address(), or the raw value of an invalid row
            domain      TEXT NOT NULL,   -- lower-cased part after the last '@'; '' when there is none
            status      TEXT NOT NULL,
            attempts    INTEGER NOT NULL DEFAULT 0,
            smtp_code   INTEGER,
            smtp_reply  TEXT,
            message_id  TEXT,
            line        INTEGER,         -- line in the contacts file
            reason      TEXT,            -- why a row is invalid or suppressed
            first_at    TEXT NOT NULL,   -- UTC ISO 8601
            updated_at  TEXT NOT NULL,
            PRIMARY KEY (campaign, recipient)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE runs (
            id           INTEGER PRIMARY KEY,
            campaign     TEXT NOT NULL,
            template     TEXT,
            contacts     TEXT,
            pid          INTEGER NOT NULL,
            host         TEXT NOT NULL,
            started_at   TEXT NOT NULL,
            finished_at  TEXT,
            interrupted  INTEGER,
            counts       TEXT            -- JSON object: status -> count
        )
        """,
        # NOCASE: an unsubscribe from jane@ must also stop mail to Jane@, even though the
        # local part is case-sensitive in theory (RFC 5321 2.4); mailing someone who
        # opted out is the worse mistake.
        """
        CREATE TABLE suppressions (
            address   TEXT NOT NULL PRIMARY KEY COLLATE NOCASE,
            reason    TEXT,
            source    TEXT NOT NULL,
            added_at  TEXT NOT NULL
        ) WITHOUT ROWID
        """,
    ),
    # 2: counts, report and the retry CSV select by status within a campaign.
    (
        "CREATE INDEX deliveries_campaign_status ON deliveries (campaign, status)",
        "CREATE INDEX runs_campaign ON runs (campaign)",
    ),
    # 3: how much of a run's delivery journal is applied (mailer.journal). The index on
    # every status made each log write 30-40 % dearer in a micro-benchmark (each message
    # changes its status twice); only the rare statuses the retry CSV selects keep one.
    (
        "ALTER TABLE runs ADD COLUMN journal_applied INTEGER",
        "DROP INDEX deliveries_campaign_status",
        "CREATE INDEX deliveries_campaign_retry ON deliveries (campaign, status) "
        "WHERE status IN ('failed', 'deferred')",
    ),
    # 4: one address rule (mailer.core.addresses.address_key): recipients and suppressions
    # are keyed by the case-folded local part and the lower-case ASCII domain, so
    # Ann@x.org and ann@x.org are one person for resume and suppression; the address as
    # written is kept beside the key (the retry CSV gives it back). Rows that become one
    # key keep the most settled of them: sent, then sending (it may have been delivered:
    # keeping it keeps it from a resend and in `mailer report`), then failed, deferred,
    # suppressed, invalid; the latest first among equals. Suppressions keep the oldest.
    (
        """
        CREATE TABLE deliveries_v4 (
            campaign    TEXT NOT NULL,
            recipient   TEXT NOT NULL,   -- address_key(), or the folded raw value of an invalid row
            address     TEXT,            -- the address as written in the contacts
            domain      TEXT NOT NULL,
            status      TEXT NOT NULL,
            attempts    INTEGER NOT NULL DEFAULT 0,
            smtp_code   INTEGER,
            smtp_reply  TEXT,
            message_id  TEXT,
            line        INTEGER,
            reason      TEXT,
            first_at    TEXT NOT NULL,
            updated_at  TEXT NOT NULL,
            PRIMARY KEY (campaign, recipient)
        ) WITHOUT ROWID
        """,
        """
        INSERT INTO deliveries_v4 (campaign, recipient, address, domain, status, attempts, smtp_code,
                                   smtp_reply, message_id, line, reason, first_at, updated_at)
        SELECT campaign, new_key, recipient, domain, status, attempts, smtp_code,
               smtp_reply, message_id, line, reason, first_at, updated_at
        FROM (
            SELECT *, mailer_address_key(recipient) AS new_key,
                   row_number() OVER (
                       PARTITION BY campaign, mailer_address_key(recipient)
                       ORDER BY CASE status WHEN 'sent' THEN 0 WHEN 'sending' THEN 1 WHEN 'failed' THEN 2
                                WHEN 'deferred' THEN 3 WHEN 'suppressed' THEN 4 ELSE 5 END,
                                updated_at DESC, recipient
                   ) AS choice
            FROM deliveries
        ) WHERE choice = 1
        """,
        "DROP TABLE deliveries",
        "ALTER TABLE deliveries_v4 RENAME TO deliveries",
        "CREATE INDEX deliveries_campaign_retry ON deliveries (campaign, status) "
        "WHERE status IN ('failed', 'deferred')",
        # The key is folded already: no NOCASE collation (it folds ASCII only).
        """
        CREATE TABLE suppressions_v4 (
            address   TEXT NOT NULL PRIMARY KEY,   -- address_key()
            reason    TEXT,
            source    TEXT NOT NULL,
            added_at  TEXT NOT NULL
        ) WITHOUT ROWID
        """,
        """
        INSERT INTO suppressions_v4 (address, reason, source, added_at)
        SELECT new_key, reason, source, added_at
        FROM (
            SELECT *, mailer_address_key(address) AS new_key,
                   row_number() OVER (PARTITION BY mailer_address_key(address) ORDER BY added_at, address) AS choice
            FROM suppressions
        ) WHERE choice = 1
        """,
        "DROP TABLE suppressions",
        "ALTER TABLE suppressions_v4 RENAME TO suppressions",
    ),
    # 5: what comes back after sending (mailer serve, mailer bounces), and the two ways
    # back from a bounce to its send: the VERP token's recipient tag
    # (mailer.core.tokens.recipient_tag, set when a row is created) and the original
    # Message-ID. Both indexes are partial: invalid and suppressed rows have neither.
    (
        "ALTER TABLE deliveries ADD COLUMN recipient_tag INTEGER",
        "UPDATE deliveries SET recipient_tag = mailer_recipient_tag(recipient) WHERE status NOT IN ('invalid')",
        "CREATE INDEX deliveries_recipient_tag ON deliveries (recipient_tag) WHERE recipient_tag IS NOT NULL",
        "CREATE INDEX deliveries_message_id ON deliveries (message_id) WHERE message_id IS NOT NULL",
        """
        CREATE TABLE feedback (
            id         INTEGER PRIMARY KEY,
            campaign   TEXT NOT NULL,
            recipient  TEXT NOT NULL,   -- address_key()
            kind       TEXT NOT NULL,   -- unsubscribed, opened, clicked, bounced_hard, bounced_soft, complained
            at         TEXT NOT NULL,   -- UTC ISO 8601
            detail     TEXT,            -- the clicked URL, the bounce's status and reason, the report id
            source     TEXT NOT NULL,   -- web, bounces, ...
            ref        TEXT             -- what makes it idempotent (a bounce's Message-ID); NULL: may repeat
        )
        """,
        "CREATE UNIQUE INDEX feedback_kind_ref ON feedback (kind, ref) WHERE ref IS NOT NULL",
        "CREATE INDEX feedback_campaign_kind ON feedback (campaign, kind)",
        "CREATE INDEX feedback_recipient ON feedback (recipient, at)",
    ),
    # 6: cooperating runs (several `mailer send` runs sharing one campaign) exist only in
    # PostgreSQL (mailer.store.pg_work); a SQLite log allows one run of a campaign at a
    # time (the campaign lock), so this step has nothing to create here.
    (),
)
SCHEMA_VERSION = len(MIGRATIONS)

# The same versions in PostgreSQL's dialect (mailer.store.postgres), one step per SQLite
# step. No PostgreSQL send log existed before version 4, so steps 1-3 are empty and step 4
# creates the tables as they are at version 4 (SQLite's step 4 re-keys rows in Python,
# which has nothing to do on a database that never held unkeyed rows). A new version
# appends a step to both tuples. Text columns hold what SQLite holds (times as ISO 8601
# text), so both stores hand out identical records; "C" collation makes address order
# the same as SQLite's (byte order) whatever the database's locale.
PG_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (),
    (),
    (),
    (
        """
        CREATE TABLE deliveries (
            campaign    TEXT NOT NULL,
            recipient   TEXT COLLATE "C" NOT NULL,
            address     TEXT,
            domain      TEXT NOT NULL,
            status      TEXT NOT NULL,
            attempts    INTEGER NOT NULL DEFAULT 0,
            smtp_code   INTEGER,
            smtp_reply  TEXT,
            message_id  TEXT,
            line        INTEGER,
            reason      TEXT,
            first_at    TEXT NOT NULL,
            updated_at  TEXT NOT NULL,
            PRIMARY KEY (campaign, recipient)
        )
        """,
        """
        CREATE TABLE runs (
            id               BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            campaign         TEXT NOT NULL,
            template         TEXT,
            contacts         TEXT,
            pid              INTEGER NOT NULL,
            host             TEXT NOT NULL,
            started_at       TEXT NOT NULL,
            finished_at      TEXT,
            interrupted      INTEGER,
            counts           TEXT,
            journal_applied  BIGINT
        )
        """,
        "CREATE INDEX runs_campaign ON runs (campaign)",
        "CREATE INDEX deliveries_campaign_retry ON deliveries (campaign, status) "
        "WHERE status IN ('failed', 'deferred')",
        """
        CREATE TABLE suppressions (
            address   TEXT COLLATE "C" NOT NULL PRIMARY KEY,
            reason    TEXT,
            source    TEXT NOT NULL,
            added_at  TEXT NOT NULL
        )
        """,
    ),
)
PG_MIGRATIONS += (
    # 5: as SQLite's step 5 (feedback, recipient_tag, message_id index); the tag is
    # computed in Python (mailer.core.tokens.recipient_tag), so rows of version 4 get it
    # from mailer.store.postgres right after this step, in the same transaction.
    (
        "ALTER TABLE deliveries ADD COLUMN recipient_tag BIGINT",
        "CREATE INDEX deliveries_recipient_tag ON deliveries (recipient_tag) WHERE recipient_tag IS NOT NULL",
        "CREATE INDEX deliveries_message_id ON deliveries (message_id) WHERE message_id IS NOT NULL",
        """
        CREATE TABLE feedback (
            id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            campaign   TEXT NOT NULL,
            recipient  TEXT COLLATE "C" NOT NULL,
            kind       TEXT NOT NULL,
            at         TEXT NOT NULL,
            detail     TEXT,
            source     TEXT NOT NULL,
            ref        TEXT
        )
        """,
        "CREATE UNIQUE INDEX feedback_kind_ref ON feedback (kind, ref) WHERE ref IS NOT NULL",
        "CREATE INDEX feedback_campaign_kind ON feedback (campaign, kind)",
        "CREATE INDEX feedback_recipient ON feedback (recipient, at)",
    ),
)
PG_MIGRATIONS += (
    # 6: cooperating runs (mailer.store.pg_work). A campaign's contact list is cut into
    # chunks of consecutive CSV lines; a run claims chunks (FOR UPDATE SKIP LOCKED) with
    # a lease it renews while it lives; a chunk is done when the run that held it ended
    # having handled all of it. campaign_work holds the list's fingerprint (every run
    # must read the same file), the pass (a new one starts when every chunk of the last
    # is done: deferred recipients are retried then) and the shared token bucket of the
    # campaign's rate (rate_next: the epoch second of the next free slot, the server's clock).
    (
        """
        CREATE TABLE campaign_work (
            campaign         TEXT PRIMARY KEY,
            contacts_sha256  TEXT NOT NULL,
            contacts         TEXT,
            lines            INTEGER NOT NULL,
            chunk_lines      INTEGER NOT NULL,
            chunks           INTEGER NOT NULL,
            pass             INTEGER NOT NULL DEFAULT 1,
            rate_next        DOUBLE PRECISION NOT NULL DEFAULT 0,
            created_at       TEXT NOT NULL
        )
        """,
        """
        CREATE TABLE work_chunks (
            campaign     TEXT NOT NULL,
            chunk        INTEGER NOT NULL,
            run_id       BIGINT,
            lease_until  TIMESTAMPTZ,
            done         BOOLEAN NOT NULL DEFAULT false,
            PRIMARY KEY (campaign, chunk)
        )
        """,
        "CREATE INDEX work_chunks_run ON work_chunks (run_id) WHERE run_id IS NOT NULL",
        """
        CREATE TABLE work_runs (
            run_id       BIGINT PRIMARY KEY,
            campaign     TEXT NOT NULL,
            lease_until  TIMESTAMPTZ NOT NULL,
            draining     BOOLEAN NOT NULL DEFAULT false
        )
        """,
    ),
)
assert len(PG_MIGRATIONS) == len(MIGRATIONS), "every schema version needs its PostgreSQL step"


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema up to :data:`SCHEMA_VERSION`, or refuse a file that is not ours."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    # IMMEDIATE: two processes opening a new log at once must not both migrate it.
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SendLogError(
                f"the send log has schema version {version}, newer than this mailer knows ({SCHEMA_VERSION}).",
                path=str(path),
                hint="A newer mailer wrote it: upgrade mailer (pip install -U mailer), or use another [log] path.",
            )
        foreign_tables = version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
        if application_id not in (0, APPLICATION_ID) or foreign_tables:
            raise SendLogError(
                "this is a SQLite database, but not a mailer send log.",
                path=str(path),
                hint="Point [log] path in mailer.toml at a file of its own.",
            )
        # Steps may call the address rule by this name (step 4 re-keys every row with it).
        conn.create_function("mailer_address_key", 1, address_key, deterministic=True)
        conn.create_function("mailer_recipient_tag", 1, recipient_tag, deterministic=True)
        for step in MIGRATIONS[version:]:
            for statement in step:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
