"""Leg derivation (`domain.legs.build_legs`), tested with plain dicts."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from webhook_service.domain.legs import build_legs

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


def test_facts_at_the_same_second_give_the_same_leg_in_any_order():
    """A tie on time is broken by kind (answered, initiated, ringing), not by arrival order."""
    ringing = {"party": "first", "kind": "ringing", "at": T0, "from_number": "+14155550111"}
    initiated = {"party": "first", "kind": "initiated", "at": T0, "from_number": "+14155550100"}
    for order in ([ringing, initiated], [initiated, ringing]):
        [leg] = build_legs(order)
        assert leg["from_number"] == "+14155550100"


def test_a_thousand_calls_derive_in_one_pass():
    """Phases find their leg by binary search: a session with a thousand calls is linear, not quadratic."""
    calls = [(30, 5, 60)] * 1000
    facts, expected = facts_for(calls)
    random.Random(7).shuffle(facts)
    assert summary(build_legs(facts)) == expected
