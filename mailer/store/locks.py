"""The campaign lock: one run of a campaign at a time on one send log (cron overlap)."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import socket
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from ..core.errors import LockedError, SendLogError
from .records import utc_now

__all__ = ["CampaignLock", "campaign_file_path", "campaign_lock_path"]


def campaign_file_path(db_path: Path, campaign: str, suffix: str) -> Path:
    """A file of ``campaign`` (its ``lock``, its ``journal``) beside the send log at ``db_path``.

    The name keeps the safe characters of the campaign for people reading the folder
    and adds a hash of the full name, so any campaign name gives a distinct, safe
    file name.
    """
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", campaign).strip("._")[:40] or "campaign"
    digest = hashlib.sha256(campaign.encode("utf-8")).hexdigest()[:10]
    return db_path.with_name(f"{db_path.name}.{readable}.{digest}.{suffix}")


def campaign_lock_path(db_path: Path, campaign: str) -> Path:
    """The lock file of ``campaign`` beside the send log at ``db_path``."""
    return campaign_file_path(db_path, campaign, "lock")


# --- the lock -----------------------------------------------------------------------


class CampaignLock:
    """An exclusive ``flock`` on one campaign of one send log.

    The kernel drops the lock when the holding process exits, even when it is killed,
    so a lock can never be left stale. The file holds the holder's pid, host and start
    time (JSON) for the message the next run shows. Use as a context manager or call
    :meth:`release`.
    """

    def __init__(self, path: Path, campaign: str, file: io.TextIOWrapper, holder: dict[str, Any]) -> None:
        self.path = path
        self.campaign = campaign
        self.holder = holder
        self._file: io.TextIOWrapper | None = file

    @classmethod
    def acquire(cls, path: Path, campaign: str, *, clock: Callable[[], datetime] = utc_now) -> CampaignLock:
        """Take the lock at ``path`` now or raise :class:`LockedError` naming its holder."""
        # The holder removes the file when it releases the lock, so that one file per
        # campaign does not pile up beside the log. A file locked after its holder
        # removed it is not the lock any more: try again with the file now at ``path``.
        for _ in range(10):
            file = cls._open_and_lock(path, campaign)
            try:
                same = os.path.samestat(os.fstat(file.fileno()), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            file.close()
        else:  # pragma: no cover - ten releases within one acquire
            raise _locked_error(path, campaign, "")
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "campaign": campaign,
            "started_at": clock().isoformat(timespec="seconds"),
        }
        try:
            # Unbuffered, so that a failed write leaves nothing for close() to retry.
            os.ftruncate(file.fileno(), 0)
            os.pwrite(file.fileno(), json.dumps(holder).encode("utf-8"), 0)
        except OSError as exc:  # a full disk, say: the lock is not held, nothing has started
            file.close()
            raise SendLogError(
                f"cannot write the lock file for campaign {campaign!r} ({exc.strerror}).",
                path=str(path),
                hint="Free some disk space and run again.",
            ) from None
        return cls(path, campaign, file, holder)

    @staticmethod
    def _open_and_lock(path: Path, campaign: str) -> io.TextIOWrapper:
        try:
            # "a+" creates the file without truncating what the holder wrote.
            file = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        except OSError as exc:
            raise SendLogError(
                f"cannot create the lock file for campaign {campaign!r} ({exc.strerror}).",
                path=str(path),
                hint="Check that the send log's folder is writable by this user, with free space.",
            ) from None
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            text = file.read()
            file.close()
            raise _locked_error(path, campaign, text) from None
        except OSError as exc:
            file.close()
            raise SendLogError(
                f"cannot lock campaign {campaign!r} ({exc.strerror}).",
                path=str(path),
                hint="Keep the send log on a local file system that supports flock.",
            ) from None
        return file

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._file is not None

    def release(self) -> None:
        """Give the lock up (idempotent) and remove the lock file.

        The file is removed while the lock is still held: a run that opened it just
        before sees, once it gets the lock, that the file is gone and starts over.
        """
        file, self._file = self._file, None
        if file is None:
            return
        try:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError:  # cannot remove it (a read-only folder?): leave it empty
                file.seek(0)
                file.truncate()
                file.flush()
        finally:
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)
            file.close()

    def __enter__(self) -> CampaignLock:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _locked_error(path: Path, campaign: str, text: str) -> LockedError:
    try:
        holder = json.loads(text)
        pid, started = holder["pid"], holder["started_at"]
        host = holder.get("host")
    except (ValueError, KeyError, TypeError):
        # The holder took the lock but has not written its details yet.
        pid, started, host = "unknown", "just now", None
    on_host = f" on {host}" if host and host != socket.gethostname() else ""
    return LockedError(
        f"campaign {campaign!r} is already being sent by another run (pid {pid}{on_host}, started {started}).",
        path=str(path),
        hint="Wait for that run to finish, or stop it; the lock is freed as soon as the process exits. "
        "Two runs of one campaign at once could mail the same people twice.",
    )
