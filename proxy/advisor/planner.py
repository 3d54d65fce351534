"""The advisor's connection to one database, and the only place it sends SQL: plans
(EXPLAIN without ANALYZE) in READ ONLY transactions that are always rolled back, under its
own statement_timeout, within a budget of explains per minute across all databases.

psycopg 3 drives it (async, libpq connection strings as users write them): the advisor
binds the values a statement ran with as the client sent them (text or binary, with the
client's type OIDs), which psycopg's dumpers allow without decoding them. Errors carry only
their SQLSTATE out of here: their messages may quote a value."""

from __future__ import annotations

import contextlib
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format

from proxy.advisor.plans import plan_root
from proxy.config import AdvisorSettings
from proxy.fingerprints import Sample

__all__ = ["APPLICATION_NAME", "Budget", "OverBudget", "PlanError", "Planner", "connect"]

APPLICATION_NAME: Final = "pgwarden-advisor"  # how its sessions show in pg_stat_activity
_STATEMENT: Final = "pgwarden_advisor"  # its one prepared statement, for generic plans
_PLACEHOLDER: Final = re.compile(r"\$(\d+)")


class OverBudget(Exception):
    """max_explains_per_minute is spent: the rest waits for the next round."""


class PlanError(Exception):
    """A statement of the advisor failed: `result` is the metric label (denied, timeout,
    error, unavailable), `sqlstate` the server's code when it sent one."""

    def __init__(self, result: str, sqlstate: str | None) -> None:
        super().__init__(f"{result} (SQLSTATE {sqlstate})")
        self.result = result
        self.sqlstate = sqlstate


class Budget:
    """At most `per_minute` explains in any 60 seconds."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._spent: deque[float] = deque()

    def take(self) -> None:
        now = self.clock()
        while self._spent and now - self._spent[0] >= 60.0:
            self._spent.popleft()
        if len(self._spent) >= self.per_minute:
            raise OverBudget
        self._spent.append(now)


class _Bound:
    """A parameter value as the client bound it, sent back to the server unchanged."""

    __slots__ = ("data", "oid")

    def __init__(self, data: bytes, oid: int) -> None:
        self.data = data
        self.oid = oid


class _BoundText(_Bound):
    pass


class _BoundBinary(_Bound):
    pass


class _TextDumper(Dumper):  # type: ignore[misc]
    format = Format.TEXT

    def dump(self, obj: _Bound) -> bytes:
        return obj.data

    def get_key(self, obj: _Bound, format: Any) -> tuple[type, int]:
        return (type(obj), obj.oid)

    def upgrade(self, obj: _Bound, format: Any) -> Dumper:
        dumper = type(self)(type(obj))
        dumper.oid = obj.oid  # the client's type, or 0: the server infers it, as it did
        return dumper


class _BinaryDumper(_TextDumper):
    format = Format.BINARY


async def connect(settings: AdvisorSettings, database: str) -> Any:
    """A new connection for the advisor to `database`: read-only by default, its own
    statement and lock timeouts, its application_name, nothing prepared behind its back."""
    timeout = f"{max(1, int(float(settings.statement_timeout) * 1000))}ms"
    conn = await psycopg.AsyncConnection.connect(
        settings.dsn or "",
        dbname=database,
        password=settings.password,
        application_name=APPLICATION_NAME,
        options=(
            f"-c default_transaction_read_only=on -c statement_timeout={timeout}"
            f" -c lock_timeout={timeout}"
        ),
        connect_timeout=max(1, int(float(settings.statement_timeout) * 5)),
        autocommit=True,
        prepare_threshold=None,
    )
    await conn.set_read_only(True)
    conn.adapters.register_dumper(_BoundText, _TextDumper)
    conn.adapters.register_dumper(_BoundBinary, _BinaryDumper)
    return conn


def _failure(exc: Exception) -> PlanError:
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return PlanError("denied", sqlstate)
    if isinstance(exc, psycopg.errors.QueryCanceled | psycopg.errors.LockNotAvailable):
        return PlanError("timeout", sqlstate)
    if isinstance(exc, psycopg.OperationalError) and sqlstate is None:
        return PlanError("unavailable", None)
    return PlanError("error", sqlstate)


class Planner:
    """Plans statements on `conn`, counting each EXPLAIN by result with `count`."""

    def __init__(self, conn: Any, budget: Budget, count: Callable[[str], None]) -> None:
        self.conn = conn
        self.budget = budget
        self.count = count
        self._hypothetical: list[int] = []  # HypoPG indexes to drop after a failure

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """A READ ONLY transaction, rolled back whatever happens; the prepared statement
        and hypothetical indexes outlive transactions, so they are dropped after it."""
        try:
            async with self.conn.transaction(force_rollback=True):
                yield
        except psycopg.Error as exc:
            raise _failure(exc) from None
        finally:
            left, self._hypothetical = self._hypothetical, []
            if not self.conn.closed:
                # a failure is on its way out already; these would only hide it
                with contextlib.suppress(psycopg.Error):
                    await self.conn.execute("DEALLOCATE ALL")
                    for oid in left:
                        await self.conn.execute("SELECT hypopg_drop_index(%s)", (oid,))

    @asynccontextmanager
    async def hypothetical(self, definition: str) -> AsyncIterator[str]:
        """A HypoPG hypothetical index (`definition`: its CREATE INDEX) for the plans made
        inside, visible to this session only; yields the name plans show it under.
        Dropped at once; after a failure, once the transaction is rolled back."""
        ((oid, name),) = await self.query(
            "SELECT indexrelid, indexname FROM hypopg_create_index(%s)", (definition,)
        )
        self._hypothetical.append(oid)
        yield str(name)
        await self.query("SELECT hypopg_drop_index(%s)", (oid,))
        self._hypothetical.remove(oid)

    async def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """A catalog read or a HypoPG call (no plan, no budget)."""
        try:
            cursor = await self.conn.execute(sql, params)
            return list(await cursor.fetchall()) if cursor.description else []
        except psycopg.Error as exc:
            raise _failure(exc) from None

    async def _explain(self, sql: str, params: Any = None) -> dict[str, Any]:
        self.budget.take()
        try:
            cursor = await self.conn.execute(sql, params)
            row = await cursor.fetchone()
        except psycopg.Error as exc:
            failure = _failure(exc)
            self.count(failure.result)
            raise failure from None
        self.count("ok")
        return plan_root(row[0])

    async def _prepare(self, statement: str, types: tuple[int, ...], count: int) -> None:
        """PREPAREs `statement` with the client's parameter types (unknown where it left
        them to the server)."""
        names = ["unknown"] * count
        known = [(i, oid) for i, oid in enumerate(types[:count]) if oid]
        if known:
            rows = await self.query(
                "SELECT t::regtype::text FROM unnest(%s::oid[]) WITH ORDINALITY AS u(t, n) "
                "ORDER BY n",
                ([oid for _, oid in known],),
            )
            for (i, _), (name,) in zip(known, rows, strict=True):
                names[i] = name
        typed = f"({', '.join(names)})" if count else ""
        await self.query("DEALLOCATE ALL")
        await self.query(f"PREPARE {_STATEMENT}{typed} AS {statement}")

    async def generic(self, statement: str, types: tuple[int, ...], count: int) -> dict[str, Any]:
        """The plan of `statement` for any values (PostgreSQL 15 has no EXPLAIN
        GENERIC_PLAN: PREPARE, a forced generic plan, EXECUTE with NULLs, never run).
        Prepared afresh each time: a prepared statement keeps its plan, which a
        hypothetical index created since would not change."""
        await self._prepare(statement, types, count)
        await self.query("SET LOCAL plan_cache_mode = force_generic_plan")
        nulls = f"({', '.join(['NULL'] * count)})" if count else ""
        return await self._explain(f"EXPLAIN (FORMAT JSON, VERBOSE) EXECUTE {_STATEMENT}{nulls}")

    async def custom(self, statement: str, sample: Sample) -> dict[str, Any]:
        """The plan for the values of `sample`, bound as the client bound them."""
        params: dict[str, Any] = {}
        for number, (data, fmt, oid) in enumerate(sample, 1):
            if data is None:
                params[f"p{number}"] = None
            else:
                params[f"p{number}"] = (_BoundBinary if fmt else _BoundText)(data, oid)
        text = _PLACEHOLDER.sub(r"%(p\1)s", statement.replace("%", "%%"))
        return await self._explain(f"EXPLAIN (FORMAT JSON, VERBOSE) {text}", params)
