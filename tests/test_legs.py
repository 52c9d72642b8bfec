"""Leg derivation (`webhooks.legs.build_legs`), tested with plain dicts like a handler, and its SQL twin."""

from __future__ import annotations

import random
import re
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from webhook_service.domain.activity import SHARDS, session_activity_of
from webhook_service.domain.legs import LEG_COLUMNS, build_legs
from webhook_service.services.inbox import APPLY_LEG_CALLBACK

T0 = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


def fact(kind: str, seconds: int, party: str = "first", **fields) -> dict:
    return {"kind": kind, "at": T0 + timedelta(seconds=seconds), "party": party} | fields


def interaction(start: int, end: int, billed: int, amount: str, first="c-1", second="c-2",
                first_status="completed", second_status="completed") -> dict:
    return {"started_at": T0 + timedelta(seconds=start), "ended_at": T0 + timedelta(seconds=end),
            "first_call_uuid": first, "second_call_uuid": second, "first_status": first_status,
            "second_status": second_status, "billed_duration": billed, "amount": Decimal(amount)}


# A party's calls: (gap before the call, ring seconds, talk seconds or None when unanswered).
calls_strategy = st.lists(
    st.tuples(st.integers(1, 600), st.integers(0, 30), st.one_of(st.none(), st.integers(0, 900))),
    min_size=1, max_size=6,
)


def facts_for(calls) -> tuple[list[dict], list[dict]]:
    """The leg events Plivo would send for these calls, and the legs they describe."""
    facts, expected, clock = [], [], 0
    for i, (gap, ring, talk) in enumerate(calls):
        start = clock + gap
        ringing, answered = start + 1, (start + 1 + ring if talk is not None else None)
        end = (answered + talk) if talk is not None else ringing + ring
        billing = {"billed_duration": 60 * i, "amount": Decimal(i), "end_event": "hangup"}
        facts += [fact("initiated", start), fact("ringing", ringing), fact("ended", end, **billing)]
        if answered is not None:
            facts.append(fact("answered", answered))
        expected.append((start, ringing, answered, end, 60 * i))
        clock = end
    return facts, expected


def summary(legs):
    def s(value):
        return None if value is None else int((value - T0).total_seconds())

    return [(s(leg["initiated_at"]), s(leg["ringing_at"]), s(leg["answered_at"]), s(leg["ended_at"]),
             leg["billed_duration"]) for leg in legs]


@settings(max_examples=200, deadline=None)
@given(calls=calls_strategy, seed=st.integers(0, 2**32 - 1))
def test_any_arrival_order_gives_exactly_the_calls(calls, seed):
    facts, expected = facts_for(calls)
    random.Random(seed).shuffle(facts)
    assert summary(build_legs(facts)) == expected


@settings(max_examples=200, deadline=None)
@given(calls=calls_strategy, seed=st.integers(0, 2**32 - 1), lost=st.integers(0, 5))
def test_a_missing_terminal_event_leaves_one_open_leg_not_a_wrong_total(calls, seed, lost):
    facts, expected = facts_for(calls)
    last_end = max(f["at"] for f in facts if f["kind"] == "ended")
    # The last call's hangup has not arrived (yet): its facts form the one open leg.
    facts = [f for f in facts if not (f["kind"] == "ended" and f["at"] == last_end)]
    random.Random(seed).shuffle(facts)
    legs = build_legs(facts)
    assert summary(legs[:-1]) == expected[:-1]
    assert legs[-1]["ended_at"] is None and summary(legs[-1:])[0][:3] == expected[-1][:3]


def test_an_interaction_gives_its_call_uuids_to_the_callback_legs_it_matches():
    facts = [
        fact("answered", 5), fact("ended", 65, billed_duration=60, end_event="hangup", amount=Decimal("0.0085")),
        fact("answered", 6, "second"), fact("ended", 64, "second", billed_duration=60, amount=Decimal("0.0085")),
    ]
    legs = build_legs(facts, [interaction(0, 63, 120, "0.017")])
    assert [(leg["party"], leg["call_uuid"], leg["source"]) for leg in legs] == [
        ("first", "c-1", "callback"), ("second", "c-2", "callback")]
    assert sum(leg["billed_duration"] for leg in legs) == 120  # nothing added: both legs were reported


def test_a_leg_only_plivo_knows_is_added_with_the_billing_the_callbacks_did_not_carry():
    facts = [fact("answered", 5), fact("ended", 65, billed_duration=60, amount=Decimal("0.0085"))]
    legs = build_legs(facts, [interaction(0, 66, 120, "0.017")])
    second = [leg for leg in legs if leg["party"] == "second"]
    assert [(leg["source"], leg["call_uuid"], leg["billed_duration"], leg["amount"]) for leg in second] == [
        ("reconcile", "c-2", 60, Decimal("0.0085"))]
    assert second[0]["answered_at"] == T0 and second[0]["ended_at"] == T0 + timedelta(seconds=66)
    # The callbacks and reconciliation, in either order, never double the total.
    assert sum(leg["billed_duration"] for leg in legs) == 120


def test_a_missed_terminal_event_is_closed_by_the_interaction_absorbing_the_open_leg():
    facts = [fact("ringing", 2, "second"), fact("answered", 8, "second")]
    [leg] = build_legs(facts, [interaction(0, 70, 60, "0.0085", first=None)])
    assert (leg["party"], leg["source"], leg["ringing_at"], leg["answered_at"]) == (
        "second", "reconcile", T0 + timedelta(seconds=2), T0 + timedelta(seconds=8))
    assert leg["ended_at"] == T0 + timedelta(seconds=70) and leg["billed_duration"] == 60


def test_an_unanswered_leg_from_an_interaction_is_failed_and_not_answered():
    legs = build_legs([], [interaction(0, 30, 0, "0", second_status="no-answer")])
    second = [leg for leg in legs if leg["party"] == "second"][0]
    assert second["end_event"] == "failed" and second["answered_at"] is None and second["billed_duration"] == 0


def test_phases_with_no_end_yet_form_one_open_leg():
    [leg] = build_legs([fact("ringing", 3), fact("initiated", 1)])
    assert leg["ended_at"] is None
    assert (leg["initiated_at"], leg["ringing_at"]) == (T0 + timedelta(seconds=1), T0 + timedelta(seconds=3))


# The webhook path derives legs in Postgres (`apply_leg_callback`, migration 0005) for sessions
# without interaction records: whatever order the facts arrive in, one at a time, the stored legs
# must be exactly `build_legs`' legs, and the counters and the daily totals (per day and shard)
# must be what the Python path computes from those legs.

PARTY_NUMBERS = {"first": "+14155550100", "second": "+14155550123"}
MIDNIGHT = datetime(2026, 11, 20, 23, 59, 55, tzinfo=UTC)  # facts on both sides of it: legs on two days
leg_event_strategy = st.fixed_dictionaries({
    # None: the caller of SessionVirtualNumberAnswer, named only by its number (or by no party's).
    "party": st.sampled_from(("first", "second", None)),
    "caller": st.sampled_from((*PARTY_NUMBERS.values(), "+19995550000")),
    "kind": st.sampled_from(("initiated", "ringing", "answered", "ended")),
    "at": st.integers(0, 20).map(lambda s: MIDNIGHT + timedelta(seconds=s)),
    "call_uuid": st.one_of(st.none(), st.sampled_from(("c-1", "c-2"))),
    "from_number": st.one_of(st.none(), st.sampled_from(("+14155550100", "+14155550111"))),
    "to_number": st.one_of(st.none(), st.just("+14155550122")),
    "billed_duration": st.one_of(st.none(), st.integers(0, 600)),
    "amount": st.one_of(st.none(), st.decimals(0, 10, places=5)),
    "end_event": st.one_of(st.none(), st.sampled_from(("hangup", "complete", "failed"))),
    "hangup_cause": st.one_of(st.none(), st.just("NORMAL_CLEARING")),
})
ARGUMENTS = re.findall(r"%\((\w+)\)s", APPLY_LEG_CALLBACK)
FACT_NAMES = ("call_uuid", "from_number", "to_number", "billed_duration", "amount", "end_event", "hangup_cause")
TOTALS = """SELECT day, shard, call_legs, answered_legs, billed_duration, answered_billed_duration, amount,
                  sessions_with_calls FROM daily_call_totals"""


def _comparable(legs) -> list[tuple]:
    return sorted((tuple(leg[c] for c in LEG_COLUMNS) for leg in legs), key=repr)


def _totals(pg) -> Counter:
    totals: Counter = Counter()
    for day, shard, *values in pg.execute(TOTALS):
        for name, value in zip(("legs", "answered", "billed", "answered_billed", "amount", "with_calls"), values,
                               strict=True):
            totals[day, shard, name] += value
    return totals


def _facts_as_stored(events) -> list[dict]:
    """The leg facts the session ends up with: the caller's party found by number; a repeated fact
    (same party, kind and time) only fills in the values it lacked, in arrival order."""
    facts: dict[tuple, dict] = {}
    for event in events:
        party = event["party"] or next((p for p, n in PARTY_NUMBERS.items() if n == event["caller"]), None)
        if party is None:
            continue
        key = (party, event["kind"], event["at"])
        fact = facts.setdefault(key, {"party": party, "kind": event["kind"], "at": event["at"]})
        for name in FACT_NAMES:
            if fact.get(name) is None:
                fact[name] = event[name]
    return list(facts.values())


@settings(max_examples=300, deadline=None)
@given(events=st.lists(leg_event_strategy, max_size=14), duplicate=st.integers(0, 13))
def test_postgres_derives_the_same_legs_as_build_legs(database_url, events, duplicate):
    session_uuid = str(uuid.uuid4())
    with psycopg.connect(database_url, autocommit=True) as pg:
        before = _totals(pg)
        outcomes = []
        for i, event in enumerate(events):
            arguments = dict.fromkeys(ARGUMENTS) | event | {
                "endpoint": "session", "method": "POST", "params": Jsonb({}), "dedupe_key": f"{session_uuid}-{i}",
                "uuid": session_uuid, "first_party": PARTY_NUMBERS["first"], "second_party": PARTY_NUMBERS["second"]}
            outcomes.append(pg.execute(APPLY_LEG_CALLBACK, arguments).fetchone()[0])
            if i == duplicate:  # the same callback again: stored once, applied once
                assert pg.execute(APPLY_LEG_CALLBACK, arguments).fetchone()[0] == "duplicate"
        sid = pg.execute("SELECT id FROM masking_sessions WHERE session_uuid = %s", [session_uuid]).fetchone()
        sid = sid[0] if sid else None
        stored = pg.execute("SELECT * FROM call_legs WHERE session_id = %s", [sid])
        stored = [dict(zip([c.name for c in stored.description], row, strict=True)) for row in stored]
        counters = pg.execute("SELECT call_count, answered_call_count, billed_duration, amount"
                              " FROM masking_sessions WHERE id = %s", [sid]).fetchall()
        change = _totals(pg)
    assert outcomes == ["applied"] * len(events)
    legs = build_legs(_facts_as_stored(events))
    assert _comparable(stored) == _comparable(legs)
    if events:
        assert counters == [(len(legs), sum(1 for leg in legs if leg["answered_at"]),
                             sum(leg["billed_duration"] or 0 for leg in legs),
                             sum((leg["amount"] or 0 for leg in legs), Decimal(0)))]
    change.subtract(before)
    expected: Counter = Counter()
    for day, activity in session_activity_of(legs, []).items():
        for name in ("legs", "answered", "billed", "answered_billed", "amount"):
            expected[day, sid % SHARDS, name] += activity[name]
        expected[day, sid % SHARDS, "with_calls"] += int(activity["legs"] > 0)
    assert {k: v for k, v in change.items() if v} == {k: v for k, v in expected.items() if v}


def test_facts_at_the_same_second_give_the_same_leg_in_any_order_in_both_paths(database_url):
    """A tie on time is broken by kind (answered, initiated, ringing), not by arrival order."""
    ringing = {"party": "first", "kind": "ringing", "at": T0, "from_number": "+14155550111"}
    initiated = {"party": "first", "kind": "initiated", "at": T0, "from_number": "+14155550100"}
    for order in ([ringing, initiated], [initiated, ringing]):
        [leg] = build_legs(order)
        assert leg["from_number"] == "+14155550100"
        session_uuid = str(uuid.uuid4())
        with psycopg.connect(database_url, autocommit=True) as pg:
            # Read the facts in arrival (heap) order, not the unique index's (which sorts by kind).
            pg.execute("SET enable_indexscan = off")
            pg.execute("SET enable_bitmapscan = off")
            for i, fact in enumerate(order):
                pg.execute(APPLY_LEG_CALLBACK, dict.fromkeys(ARGUMENTS) | fact | {
                    "endpoint": "session", "method": "POST", "params": Jsonb({}),
                    "dedupe_key": f"{session_uuid}-{i}", "uuid": session_uuid})
            assert pg.execute("SELECT l.from_number FROM call_legs l JOIN masking_sessions s ON s.id = l.session_id"
                              " WHERE s.session_uuid = %s", [session_uuid]).fetchall() == [("+14155550100",)]
