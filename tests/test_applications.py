"""Application-scoped detector state: shared by one application's sessions, bounded, dropped
when idle; and the parse-tree facts the rules of issue 12 read."""

from __future__ import annotations

import pytest

from proxy.analysis.analyzer import Analyzer, Lookup
from proxy.detectors import Applications, SessionIdentity, build_detectors
from proxy.detectors.repeated_read import RepeatedRead, RepeatedReadOptions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def app(name: str, database: str = "db", user: str = "u") -> SessionIdentity:
    return SessionIdentity(database=database, user=user, application_name=name)


def test_sessions_of_one_application_share_one_state_and_others_do_not() -> None:
    apps = Applications()
    first = apps.attach("rule", app("web"), list)
    second = apps.attach("rule", app("web"), list)
    assert first is second
    assert apps.attach("rule", app("worker"), list) is not first
    assert apps.attach("rule", app("web", user="other"), list) is not first
    assert apps.attach("rule", app("web", database="other"), list) is not first
    assert apps.attach("other_rule", app("web"), list) is not first


def test_a_state_outlives_its_sessions_until_idle() -> None:
    clock = Clock()
    apps = Applications(idle=60.0, clock=clock)
    state = apps.attach("rule", app("web"), list)
    apps.release("rule", app("web"), state)
    clock.now += 59
    apps.attach("rule", app("other"), list)  # a sweep happens when a state is made
    assert apps.attach("rule", app("web"), list) is state  # a session came back in time
    apps.release("rule", app("web"), state)
    clock.now += 61
    apps.attach("rule", app("other2"), list)
    assert apps.attach("rule", app("web"), list) is not state


def test_a_held_state_is_never_dropped_however_idle() -> None:
    clock = Clock()
    apps = Applications(idle=1.0, clock=clock)
    state = apps.attach("rule", app("web"), list)
    clock.now += 3600
    apps.attach("rule", app("other"), list)
    assert apps.attach("rule", app("web"), list) is state


def test_the_number_of_applications_is_bounded() -> None:
    apps = Applications(max_applications=3)
    held = [apps.attach("rule", app(f"a{i}"), list) for i in range(3)]
    # every state is held: a fourth application gets a state of its own, not registered
    extra = apps.attach("rule", app("a3"), list)
    assert extra is not apps.attach("rule", app("a3"), list)
    assert len(apps) == 3
    # once one is released, room is made by dropping it
    apps.release("rule", app("a0"), held[0])
    shared = apps.attach("rule", app("a3"), list)
    assert shared is apps.attach("rule", app("a3"), list)
    assert len(apps) == 3
    assert apps.attach("rule", app("a1"), list) is held[1]


def test_releasing_an_unshared_or_dropped_state_is_harmless() -> None:
    apps = Applications(max_applications=1)
    kept = apps.attach("rule", app("a"), list)
    own = apps.attach("rule", app("b"), list)
    apps.release("rule", app("b"), own)
    apps.release("rule", app("a"), kept)
    apps.release("rule", app("a"), kept)  # twice: no error, no negative count
    assert apps.attach("rule", app("a"), list) is kept


def test_detectors_get_their_applications_state_through_build_detectors() -> None:
    """Two sessions of one application share the rule's state; another application's
    session does not; released by both, it goes once idle."""
    clock = Clock()
    apps = Applications(idle=1.0, clock=clock)
    options = {"repeated_read": RepeatedReadOptions()}
    (one,) = build_detectors(options, app("web"), apps)
    (two,) = build_detectors(options, app("web"), apps)
    (other,) = build_detectors(options, app("worker"), apps)
    assert isinstance(one, RepeatedRead) and isinstance(two, RepeatedRead)
    assert isinstance(other, RepeatedRead)
    assert one._reads is two._reads
    assert other._reads is not one._reads
    for detector in (one, two, two):  # a second release is harmless
        detector.release()
    assert len(apps) == 2  # released, dropped once idle, at the next sweep
    clock.now += 2
    (three,) = build_detectors(options, app("web"), apps)
    assert isinstance(three, RepeatedRead) and three._reads is not one._reads
    assert len(apps) == 2  # worker's (still held) and web's new one


def facts(sql: str) -> dict[str, object]:
    info = Analyzer().analyze(sql)[0].info
    fields = type(info).__dataclass_fields__
    return {k: getattr(info, k) for k in fields if getattr(info, k) != fields[k].default}


@pytest.mark.parametrize(
    ("sql", "isolation", "scope"),
    [
        ("BEGIN ISOLATION LEVEL REPEATABLE READ", "repeatable read", "transaction"),
        (
            "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY",
            "serializable",
            "transaction",
        ),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "serializable", "transaction"),
        (
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED",
            "read committed",
            "session",
        ),
        ("SET default_transaction_isolation = 'serializable'", "?", "session"),
        ("SET LOCAL default_transaction_isolation TO 'serializable'", "?", "transaction"),
        ("BEGIN", "", ""),
        ("SET search_path = app", "", ""),
    ],
)
def test_isolation_levels_asked_for(sql: str, isolation: str, scope: str) -> None:
    info = Analyzer().analyze(sql)[0].info
    assert (info.isolation, info.isolation_scope) == (isolation, scope)


def test_write_facts() -> None:
    update = facts("UPDATE public.accounts SET balance = balance + $1, note = $2 WHERE id = $3")
    assert update["target"] == "public.accounts"
    assert update["set_columns"] == ("balance", "note")
    assert update["set_params"] == (0, 2)
    assert update["set_reads_columns"] is True
    plain = facts("UPDATE accounts SET balance = $1 WHERE id = $2")
    assert "set_reads_columns" not in plain and plain["set_params"] == (1,)
    insert = facts("INSERT INTO users (email, name, created) VALUES ($1, 'x', now())")
    assert insert["target"] == "users"
    assert insert["insert_params"] == (1, 2, 0)
    assert facts("DELETE FROM t WHERE id = 4")["target"] == "t"
    assert "insert_params" not in facts("INSERT INTO t (a) VALUES ($1), ($2)")


def test_orm_key_lookup_shapes_are_lookups() -> None:
    typeorm = facts('SELECT "t"."id" FROM "t" "t" WHERE (("t"."id" = $1)) LIMIT 1')
    assert typeorm["lookups"] == (Lookup("id", 1, "t"),) and typeorm["has_limit"] is True
    one_element = facts('UPDATE "t" SET "n" = $1 WHERE "id" IN ($2)')
    assert one_element["lookups"] == (Lookup("id", 2, "t"),)
    assert "batched_lookup" not in one_element
    several = facts("SELECT * FROM t WHERE id IN ($1, $2)")
    assert several["batched_lookup"] is True and "lookups" not in several


def test_catalog_only_and_order_by() -> None:
    assert facts("SELECT 1 FROM information_schema.tables WHERE table_name = $1")["catalog_only"]
    assert facts("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON true")["catalog_only"]
    assert facts("SELECT * FROM pg_catalog.pg_type")["catalog_only"]
    assert "catalog_only" not in facts("SELECT * FROM pg_class c JOIN users u ON true")
    assert "catalog_only" not in facts("SELECT 1")
    assert facts("SELECT * FROM t ORDER BY id, t.b DESC")["order_by"] == ("id", "b")
    assert "order_by" not in facts("SELECT * FROM t ORDER BY lower(name)")
