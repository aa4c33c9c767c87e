"""Wake a background loop when PostgreSQL says rows were committed (LISTEN/NOTIFY).

The loops of one process (the outbox relay, the job runner, the mail, webhook and alert
senders) share one listening connection per database URL, each on its own channel with its
own event: PostgreSQL (up to 16 at least) signals *every* listening backend of the database
at each commit that notifies, whatever its channels, and each one signalled reads the
notification queue in a transaction of its own. With a connection per loop, the five of
`ordermill run` made five such transactions (and five backend wake-ups) for every commit
that inserted an event, a job or a mail: about half of the full flow's transactions (see
docs/performance.md, "Sustained load"). One connection makes one.

The connection is reopened when lost (by whichever loop next calls `ensure`); on reopening,
every loop is woken once, since what was committed meanwhile was not heard. The loops keep
their timers, so nothing waits forever while LISTEN is down. With no URL (behind PgBouncer
in transaction pooling and no DATABASE_DIRECT_URL: a LISTEN there hears nothing) there is
no listener: the loops run on their timers alone (RELAY_SWEEP_SECONDS, JOB_POLL_SECONDS).

Work written by the process whose loop takes it is heard without NOTIFY (`heard_here`): the
statement that writes it tells its trigger not to notify (migration 0043), and the
connection (`Connection`, every pool's) wakes the process's loops on that channel once the
transaction commits. With three worker processes, every notifying commit cost three
listeners' reads of the queue and woke three relays for events one would publish, and
notifying commits queue behind one lock of the whole cluster (docs/performance.md, "Work
heard where it is written")."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from asyncpg.transaction import Transaction, TransactionState

log = logging.getLogger("ordermill.wakeup")


class _Listener:
    """One LISTEN connection of an event loop to a database, for every channel its wake-ups
    name; a notification sets the events of its channel's wake-ups."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.wakeups: set[Wakeup] = set()
        self.conn: asyncpg.Connection | None = None
        self._listening: set[str] = set()
        self._heard = False  # listened before: a new connection may have missed commits
        self._lock = asyncio.Lock()

    @property
    def up(self) -> bool:
        return self.conn is not None and not self.conn.is_closed()

    async def ensure(self, wakeup: Wakeup) -> None:
        self.wakeups.add(wakeup)
        if self.up and wakeup.channel in self._listening:
            return
        async with self._lock:
            try:
                if not self.up:
                    await self._connect()
                if wakeup.channel not in self._listening:
                    assert self.conn is not None
                    await self.conn.add_listener(wakeup.channel, self._on_notify)
                    self._listening.add(wakeup.channel)
            except Exception as exc:  # whatever the cause, the timer does the listener's work
                log.warning(
                    "listener unavailable; the timer takes over",
                    extra={"channel": wakeup.channel, "error": f"{type(exc).__name__}: {exc}"},
                )
                await self._drop()

    async def _connect(self) -> None:
        await self._drop()
        self.conn = await asyncpg.connect(self.database_url)
        for channel in sorted({w.channel for w in self.wakeups}):
            await self.conn.add_listener(channel, self._on_notify)
            self._listening.add(channel)
        reopened, self._heard = self._heard, True
        if reopened:
            for wakeup in self.wakeups:  # what was committed while deaf was not heard
                wakeup.event.set()

    async def _drop(self) -> None:
        conn, self.conn = self.conn, None
        self._listening.clear()
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await conn.close()

    def _on_notify(self, _conn: Any, _pid: int, channel: str, _payload: str) -> None:
        for wakeup in self.wakeups:
            if wakeup.channel == channel:
                wakeup.event.set()

    async def leave(self, wakeup: Wakeup) -> bool:
        """Forget this wake-up; close the connection when it was the last. True if closed."""
        self.wakeups.discard(wakeup)
        if self.wakeups:
            return False
        async with self._lock:
            if not self.wakeups:
                await self._drop()
                return True
        return False


# Per event loop (tests run several), per database URL.
_LISTENERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Listener]] = (
    weakref.WeakKeyDictionary()
)


def _listener(database_url: str) -> _Listener:
    mine = _LISTENERS.setdefault(asyncio.get_running_loop(), {})
    if database_url not in mine:
        mine[database_url] = _Listener(database_url)
    return mine[database_url]


# The loops of this process that a commit of its own wakes in memory, per event loop (tests
# run several) and channel: those whose `Wakeup` is open (between `ensure` and `close`).
_HERE: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, set[Wakeup]]] = (
    weakref.WeakKeyDictionary()
)


def _here() -> dict[str, set[Wakeup]]:
    return _HERE.setdefault(asyncio.get_running_loop(), {})


def _takers(channel: str, database: str | None) -> list[Wakeup]:
    """This process's loops on `channel` for this database that take work now."""
    return [w for w in _here().get(channel, ()) if w.serves(database) and w.accepting()]


def heard_here(conn: asyncpg.Connection, channel: str) -> str | None:
    """For a statement about to write rows that `channel`'s loops take: the channel to give
    `ordermill_heard_here($n)` in that statement when a loop of this process wakes on it (on
    this database, and taking work now: not a relay backing off from its broker, not a job
    runner with every slot busy, not a loop stopping) and the connection will wake that loop
    once its transaction commits. The statement's trigger then does not notify. None
    otherwise (no such loop here, no transaction, a connection of another class): the
    trigger notifies every process as before, so a caller that gets None, or a writer that
    never asks, only costs the NOTIFY it always did."""
    note = getattr(conn, "wake_after_commit", None)  # a pool's proxy passes it on
    if note is None or not conn.is_in_transaction():
        return None
    if not _takers(channel, getattr(conn, "database_name", None)):
        return None
    note(channel)
    return channel


def wake_here(channels: set[str], database: str | None = None) -> None:
    """Wake this process's loops on these channels (their rows were just committed here)."""
    here = _here()
    for channel in channels:
        for wakeup in here.get(channel, ()):
            if wakeup.serves(database):
                wakeup.event.set()


# A transaction object that has not ended the transaction (never started, or a call asyncpg
# refused, such as `commit()` inside `async with`): it changes nothing of what is noted.
_NOT_ENDED = (TransactionState.NEW, TransactionState.STARTED)


class _WakingTransaction(Transaction):
    """asyncpg's transaction; the outermost one, once it ended the transaction, lets its
    connection wake what it wrote for, or forget it after a rollback. A COMMIT that failed
    wakes as well: its outcome may be unknown (the connection lost after the server
    committed, a cancellation while waiting), and a wake-up for nothing costs one pass."""

    __slots__ = ()

    async def __aexit__(self, extype: Any, ex: Any, tb: Any) -> None:
        try:
            await super().__aexit__(extype, ex, tb)
        finally:
            self._ended(committing=extype is None)

    async def commit(self) -> None:
        try:
            await super().commit()
        finally:
            self._ended(committing=True)

    async def rollback(self) -> None:
        try:
            await super().rollback()
        finally:
            self._ended(committing=False)

    def _ended(self, *, committing: bool) -> None:
        if not self._nested and self._state not in _NOT_ENDED:
            self._connection.transaction_ended(committing)


class Connection(asyncpg.Connection):
    """The connection of every Ordermill pool (`db.create_pool`): it remembers which channels
    its transaction wrote for (`heard_here`) and wakes this process's loops on them when the
    transaction commits. Only transactions opened with `transaction()` are followed; a
    statement outside one is never told it is heard here, so it notifies."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._heard: set[str] = set()

    @property
    def database_name(self) -> str | None:
        params = getattr(self, "_params", None)
        return getattr(params, "database", None)

    def wake_after_commit(self, channel: str) -> None:
        self._heard.add(channel)

    def transaction(self, *, isolation: str | None = None, readonly: bool = False,
                    deferrable: bool = False) -> Transaction:
        self._check_open()
        return _WakingTransaction(self, isolation, readonly, deferrable)

    def transaction_ended(self, committing: bool) -> None:
        heard, self._heard = self._heard, set()
        if committing and heard:
            wake_here(heard, self.database_name)


class Wakeup:
    def __init__(self, database_url: str | None, channel: str, *,
                 accepting: Callable[[], bool] = lambda: True) -> None:
        """`accepting()`: whether the loop takes work now; while it does not, this process's
        commits notify every process, as if no loop were here (`heard_here`)."""
        self.database_url = database_url
        self.channel = channel
        self.event = asyncio.Event()
        self.accepting = accepting
        # The database its loop works on: only commits there are heard here (tests and
        # benches run loops of several databases in one process). None: any (no URL).
        self.database = (urlsplit(database_url).path.lstrip("/") or None) if database_url else None
        self._said_none = False

    def serves(self, database: str | None) -> bool:
        return self.database is None or database is None or self.database == database

    async def ensure(self) -> None:
        """Listen, if not listening already (and there is somewhere to); heard in memory
        after this process's own commits (`heard_here`) until `close`."""
        _here().setdefault(self.channel, set()).add(self)
        if self.database_url is None:
            if not self._said_none:
                log.info(
                    "no LISTEN behind PgBouncer without DATABASE_DIRECT_URL; the timer wakes this loop",
                    extra={"channel": self.channel},
                )
                self._said_none = True
            return
        await _listener(self.database_url).ensure(self)

    @property
    def listening(self) -> bool:
        """Whether a LISTEN connection hears this channel now."""
        if self.database_url is None:
            return False
        listener = _LISTENERS.get(asyncio.get_running_loop(), {}).get(self.database_url)
        return (
            listener is not None
            and listener.up
            and self in listener.wakeups
            and self.channel in listener._listening
        )

    def leave_here(self) -> None:
        """No longer woken by this process's commits (stopping): they notify again, so
        another process's loop takes what this one will not."""
        _here().get(self.channel, set()).discard(self)

    async def close(self) -> None:
        self.leave_here()
        if self.database_url is None:
            return
        mine = _LISTENERS.get(asyncio.get_running_loop(), {})
        listener = mine.get(self.database_url)
        if listener is not None and await listener.leave(self) and not listener.wakeups:
            if mine.get(self.database_url) is listener:
                del mine[self.database_url]
