"""The rows a cooperating run mails: the chunks of the list it claims, pass after pass.

Every run reads the whole contact file (duplicates are found across chunks, as in a
single run) and mails only the rows of chunks it holds (:mod:`mailer.store.pg_work`).
It claims one chunk at a time, when it has none ahead of where it reads and its relay
has started most of what it holds, those ahead first; a chunk behind (given up by a run that stopped, or left by one that died) is
read in another pass over the file. At the end of the file a run with nothing left to
claim waits while other runs still read theirs — one of them may die and leave its
chunks to be taken — and ends when every unfinished chunk belongs to a live run that
has also reached the end (or to none).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..store.pg_work import CampaignWork

__all__ = ["Claims"]

# After a claim found nothing, wait this long before asking again while reading (the
# others hold everything ahead: asking at every chunk would be a query per chunk).
_QUIET = 0.5
# At the end of the file, how often to look for work left by others.
_POLL = 0.5
# While the relay works through this run's backlog, how often to look before claiming more.
_BACKLOG_POLL = 0.01


class Claims:
    """Decides, line by line, whether this run mails a row; :meth:`next_pass` after each pass."""

    def __init__(
        self,
        work: CampaignWork,
        *,
        stopped: Callable[[], bool],
        backlog: Callable[[], int] = lambda: 0,
        max_backlog: int = 0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self.work = work
        self.stopped = stopped
        self.backlog = backlog
        self.max_backlog = max_backlog
        self.clock = clock
        self.sleep = sleep
        self.ahead: set[int] = set()  # claimed chunks still to be read in this pass
        self.behind: set[int] = set()  # claimed chunks before where this pass reads: the next pass
        self.position = -1
        self.claimed = 0
        self.passes = 1
        self._quiet_until = 0.0

    def keep(self, line: int) -> bool:
        """Whether the row starting on ``line`` is this run's to mail (claims more as it goes)."""
        chunk = self.work.chunk_of(line)
        if chunk != self.position:
            self.position = chunk
            if self.ahead:
                self.ahead = {c for c in self.ahead if c >= chunk}
            if not self.ahead and not self.stopped() and self.clock() >= self._quiet_until:
                self._claim(chunk)
        return chunk in self.ahead

    def _claim(self, position: int) -> None:
        # Claim when the relay has nearly caught up: what a run holds (rendered, queued)
        # is what the others cannot send, and a run would otherwise claim as fast as it
        # renders, far ahead of its relay.
        while self.backlog() > self.max_backlog and not self.stopped():
            self.work.check_heartbeat()  # a database gone: stop here, not wait forever
            self.sleep(_BACKLOG_POLL)
        got = self.work.claim(position=position)
        self.claimed += len(got)
        if not got:
            self._quiet_until = self.clock() + _QUIET
        for chunk in got:
            (self.ahead if chunk >= position else self.behind).add(chunk)

    def next_pass(self) -> bool:
        """Called at the end of the file: True when this run has chunks to read in another pass."""
        self.ahead = set()  # every line was read: chunks ahead with no row in them are done too
        while not self.behind:
            if self.stopped():
                return False
            got = self.work.claim(position=self.work.chunks)
            if got:
                self.claimed += len(got)
                self.behind.update(got)
                break
            if not self.work.others_pending():
                return False
            self.sleep(_POLL)
        self.ahead, self.behind = self.behind, set()
        self.position = -1
        self._quiet_until = 0.0
        self.passes += 1
        return True
