"""The one derivation (`domain.projection.project`), tested with plain values.

Calls are planned here (who calls, whether the other answers, how long they talk); the facts Plivo
would report for them, and the totals it would bill, are written from the plan with plain
arithmetic, independently of the product. Then: any arrival order, duplicates, Plivo's interaction
records and facts projected one at a time all give the natural order's projection, and that
projection bills what the plan says.
"""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from webhook_service.domain.callbacks import CallbackFact
from webhook_service.domain.projection import FactLog, SessionRecord, Since, project

T0 = datetime(2026, 11, 20, 23, 50, tzinfo=UTC)  # calls run past midnight: activity on two days
FIRST, SECOND, VIRTUAL = "+14155550100", "+14155550123", "+16505550100"
NUMBERS = {"first": FIRST, "second": SECOND}
RATE = Decimal("0.00850")  # per started minute per leg
RECORD = SessionRecord(session_uuid="s-1", status="active", expired_at=None, first_party=FIRST, second_party=SECOND,
                       original_virtual_number=VIRTUAL, virtual_number=VIRTUAL, last_interaction_at=None,
                       created_at=T0 - timedelta(hours=1))


def minutes(seconds: int) -> int:
    return -(-seconds // 60)


# One call: (who calls, the vocabulary, whether the callee answers, seconds of talk, seconds before it).
calls_strategy = st.lists(st.tuples(st.sampled_from(("first", "second")), st.sampled_from(("legacy", "latest")),
                                    st.booleans(), st.integers(1, 900), st.integers(1, 600)), min_size=1, max_size=5)


def plan(calls) -> tuple[list[CallbackFact], dict, list[dict]]:
    """The facts Plivo reports for `calls`, the totals it bills, and its interaction records."""
    facts: list[CallbackFact] = []
    interactions = []
    billed = answered = legs = 0
    clock = T0
    seq = 0

    def fact(kind: str, at: datetime, **values) -> None:
        nonlocal seq
        seq += 1
        facts.append(CallbackFact(session_uuid="s-1", kind=kind, event_name="x", at=at, sequence_number=seq,
                                  first_party=FIRST, second_party=SECOND, virtual_number=VIRTUAL, **values))

    for n, (caller, vocabulary, picked_up, talk, gap) in enumerate(calls):
        callee = "second" if caller == "first" else "first"
        start = clock + timedelta(seconds=gap)
        ring = start + timedelta(seconds=2)
        answer = ring + timedelta(seconds=5)
        end = answer + timedelta(seconds=talk) if picked_up else ring + timedelta(seconds=30)
        caller_seconds = int((end - start).total_seconds())
        callee_seconds = talk if picked_up else 0
        numbers = {"from_number": NUMBERS[caller], "to_number": NUMBERS[callee]}
        if vocabulary == "legacy":
            fact("leg", start, party=caller, phase="answered", **numbers)
        else:
            fact("leg", start, party=None, phase="answered", **numbers)  # SessionVirtualNumberAnswer
            fact("leg", start + timedelta(seconds=1), party=callee, phase="initiated", **numbers)
        fact("leg", ring, party=callee, phase="ringing", **numbers)
        if picked_up:
            fact("leg", answer, party=callee, phase="answered", **numbers)
        ending = "hangup" if vocabulary == "legacy" else ("complete" if picked_up else "failed")
        for party, seconds, how in ((callee, callee_seconds, ending), (caller, caller_seconds, "hangup"
                                                                       if vocabulary == "legacy" else "complete")):
            fact("leg", end, party=party, phase="ended", end_event=how, duration=seconds,
                 billed_duration=60 * minutes(seconds), amount=RATE * minutes(seconds), **numbers)
        if picked_up:
            fact("recording", answer, recording_uuid=f"rec-{n}", recording_status="initiated",
                 recording_started_at=answer)
            fact("recording", end, recording_uuid=f"rec-{n}", recording_status="completed", recording_started_at=answer,
                 recording_ended_at=end, recording_duration=talk, recording_url=f"https://media/rec-{n}.mp3")
        legs += 2
        answered += 1 + picked_up
        billed += 60 * (minutes(caller_seconds) + minutes(callee_seconds))
        interactions.append({
            "started_at": start, "ended_at": end,
            f"{caller}_call_uuid": f"call-{n}-{caller}", f"{callee}_call_uuid": f"call-{n}-{callee}",
            f"{caller}_status": "completed", f"{callee}_status": "completed" if picked_up else "no-answer",
            "billed_duration": 60 * (minutes(caller_seconds) + minutes(callee_seconds)),
            "amount": RATE * (minutes(caller_seconds) + minutes(callee_seconds)),
            "recording_uuid": f"rec-{n}" if picked_up else None, "recording_resource_url": None,
        })
        clock = end
    totals = {"call_count": legs, "answered_call_count": answered, "billed_duration": billed,
              "amount": RATE * (billed // 60), "recording_count": sum(1 for c in calls if c[2])}
    return facts, totals, interactions


def counters(projection) -> dict:
    return {k: projection.session[k] for k in ("call_count", "answered_call_count", "billed_duration", "amount",
                                                "recording_count")}


@settings(max_examples=300, deadline=None)
@given(calls=calls_strategy, seed=st.integers(0, 2**32 - 1), duplicates=st.integers(0, 10))
def test_any_order_and_duplicates_give_the_natural_projection_and_the_planned_bill(calls, seed, duplicates):
    facts, totals, _ = plan(calls)
    natural = project(RECORD, facts)
    rng = random.Random(seed)
    shuffled = facts + [rng.choice(facts) for _ in range(duplicates)]
    rng.shuffle(shuffled)
    assert project(RECORD, shuffled) == natural
    assert counters(natural) == totals
    assert len(natural.legs) == totals["call_count"] and all(leg["ended_at"] for leg in natural.legs)


@settings(max_examples=200, deadline=None)
@given(calls=calls_strategy, seed=st.integers(0, 2**32 - 1), lost=st.sets(st.integers(0, 60), max_size=6))
def test_lost_callbacks_with_plivos_records_give_the_planned_bill_in_any_order(calls, seed, lost):
    """Reconciliation's facts fill what callbacks missed, interleaved in any order, nothing counted twice."""
    facts, totals, interactions = plan(calls)
    kept = [f for i, f in enumerate(facts) if i not in lost]
    rng = random.Random(seed)
    rng.shuffle(kept)
    rng.shuffle(interactions)
    everything = project(RECORD, facts, interactions)
    healed = project(RECORD, kept, interactions)
    assert counters(healed) == counters(everything) == totals
    # With every callback there, Plivo's records only add call UUIDs.
    assert {leg["source"] for leg in everything.legs} == {"callback"}
    assert all(leg["call_uuid"] for leg in everything.legs)


@settings(max_examples=150, deadline=None)
@given(calls=calls_strategy, seed=st.integers(0, 2**32 - 1), timeout=st.booleans())
def test_projecting_fact_by_fact_gives_the_projection_of_all_at_once(calls, seed, timeout):
    """What the projector writes back (status, parties, number, last interaction) is read again by
    the next projection: folding facts in one at a time must end where projecting them all does."""
    facts, _, _ = plan(calls)
    if timeout:
        facts.append(CallbackFact(session_uuid="s-1", kind="timeout", event_name="SessionTimeout",
                                  at=T0 + timedelta(hours=3)))
    random.Random(seed).shuffle(facts)
    discovered = replace(RECORD, first_party=None, second_party=None, original_virtual_number=None,
                         virtual_number=None)
    record, seen = discovered, []
    for fact in facts:
        seen.append(fact)
        step = project(record, seen)
        record = replace(record, **{k: step.session[k] for k in ("status", "expired_at", "first_party",
                                                                  "second_party", "virtual_number",
                                                                  "last_interaction_at")})
    assert step == project(discovered, facts)
    assert step.session["status"] == ("expired" if timeout else "active")


def _since(previous, interactions, changed):
    return Since(previous, tuple(interactions), min((f.at for f in changed), default=None))


@settings(max_examples=600, deadline=None)
@given(calls=calls_strategy.filter(lambda calls: len(calls) > 1), seed=st.integers(0, 2**32 - 1),
       split=st.floats(0, 1), reconciled=st.sampled_from(
    ("never", "before", "after")), replayed=st.integers(0, 3), duplicates=st.integers(0, 3),
    swaps=st.integers(-1, 4), going_on=st.integers(0, 4), jitter=st.booleans())
def test_projecting_again_from_the_previous_projection_gives_the_projection_of_all_facts(
        calls, seed, split, reconciled, replayed, duplicates, swaps, going_on, jitter):
    """The projector keeps a busy session's facts and projection and derives again only what the
    new facts can change: for any facts seen before and after (in any order, with duplicates,
    replayed facts read differently, the last call still going on, parties' legs ending seconds
    apart, and Plivo's records arriving at any point) that gives exactly the projection of all the
    facts at once."""
    facts, _, interactions = plan(calls)
    rng = random.Random(seed)
    facts = sorted(facts, key=lambda f: f.at)[:len(facts) - going_on]  # the last call's end not reported yet
    if jitter:
        facts = [f._replace(at=f.at + timedelta(seconds=rng.choice((0, 0, 1, 2)))) for f in facts]
    if swaps < 0:  # any order
        rng.shuffle(facts)
    else:  # nearly as they happened, as a busy session's facts come (a few swapped)
        for _ in range(swaps):
            i = rng.randrange(len(facts))
            j = min(i + rng.randint(1, 3), len(facts) - 1)
            facts[i], facts[j] = facts[j], facts[i]
    for _ in range(duplicates):  # the same fact again, soon after
        i = rng.randrange(len(facts))
        facts.insert(i + rng.randint(1, 3), facts[i])
    cut = int(split * len(facts))
    seen, new = facts[:cut], facts[cut:]
    before = interactions if reconciled == "before" else []
    # Reconciliation lists the calls that are over: those of the first few.
    after = {"never": [], "before": interactions, "after": interactions[:rng.randint(1, len(interactions))]}[reconciled]
    log = FactLog(seen)
    previous = project(RECORD, log, before)
    # A replay reads a stored callback again and may read it differently (a bug fixed since).
    changed = list(new)
    recent = sorted(seen, key=lambda f: f.at)[-3:] if rng.random() < 0.7 else seen  # what a replay reads again
    for old in rng.sample(recent, min(replayed, len(recent))):
        if old in log.facts:
            log.remove(old)
            fixed = old._replace(at=old.at + timedelta(seconds=rng.choice((0, 0, -3, 3))), sequence_number=0,
                                 hangup_cause=rng.choice((None, "NORMAL_CLEARING", "USER_BUSY")))
            log.add(fixed)
            changed += [old, fixed]
            facts[facts.index(old)] = fixed
    for fact in new:
        log.add(fact)
    again = project(RECORD, log, after, _since(previous, before, changed))
    assert again == project(RECORD, facts, after)


def test_a_new_call_derives_only_its_own_legs_again():
    """The incremental path is taken when a session's next call arrives (else the test above could
    pass by always deriving everything)."""
    facts, _, interactions = plan([("first", "legacy", True, 60, 30)] * 4)
    old, new = facts[:-7], facts[-7:]  # the last call's facts (legacy, answered: 7)
    log = FactLog(old)
    previous = project(RECORD, log, interactions[:-1])
    for fact in new:
        log.add(fact)
    again = project(RECORD, log, interactions[:-1], _since(previous, interactions[:-1], new))
    assert again.kept_legs_until is not None
    kept = [leg for leg in again.legs if leg["ended_at"] <= again.kept_legs_until[leg["party"]]]
    assert len(kept) == 6 and all(any(leg is p for p in previous.legs) for leg in kept)
    assert again == project(RECORD, facts, interactions[:-1])


def test_a_session_expires_at_the_earliest_timeout_and_never_comes_back():
    late, early = (CallbackFact(session_uuid="s-1", kind="timeout", event_name="SessionTimeout", at=T0 + timedelta(
        minutes=m)) for m in (30, 10))
    for order in ([late, early], [early, late]):
        session = project(RECORD, order).session
        assert (session["status"], session["expired_at"]) == ("expired", T0 + timedelta(minutes=10))
    already = replace(RECORD, status="expired", expired_at=T0)
    assert project(already, [late]).session["expired_at"] == T0


def test_the_newest_replacement_is_the_number_whatever_order_they_came_in():
    replaced = [CallbackFact(session_uuid="s-1", kind="number", event_name="SessionVirtualNumberReplaced",
                             at=T0 + timedelta(minutes=m), virtual_number=number)
                for m, number in ((5, "+16505550111"), (9, "+16505550122"))]
    for order in (replaced, replaced[::-1]):
        projection = project(RECORD, order)
        assert projection.session["virtual_number"] == "+16505550122"
        assert [n for n, _ in projection.numbers] == [VIRTUAL, "+16505550111", "+16505550122"]
    assert project(RECORD, []).numbers == []


def test_the_caller_known_only_by_number_belongs_to_no_leg_when_no_party_has_it():
    stranger = CallbackFact(session_uuid="s-1", kind="leg", event_name="SessionVirtualNumberAnswer", at=T0,
                            phase="answered", from_number="+19995550000")
    assert project(RECORD, [stranger]).legs == []


def test_billing_counts_on_a_legs_end_only():
    """Plivo lists Amount and BilledDuration on every event; only a terminal event's are a bill."""
    ring = CallbackFact(session_uuid="s-1", kind="leg", event_name="SessionSecondPartyRing", at=T0, party="second",
                        phase="ringing", billed_duration=600, amount=Decimal("9"))
    [leg] = project(RECORD, [ring]).legs
    assert leg["billed_duration"] is None and leg["amount"] is None


def test_a_session_ends_at_the_earliest_time_anyone_reported_and_was_last_used_at_the_latest():
    """Plivo's report, the API's expire, a SessionTimeout and the expiry time once passed each expire a
    session; together, at the earliest of them. These are inputs: nobody else writes the outcome."""
    timeout = CallbackFact(session_uuid="s-1", kind="timeout", event_name="SessionTimeout",
                           at=T0 + timedelta(minutes=40))
    due = replace(RECORD, expires_at=T0 + timedelta(minutes=30))
    reports = {"plivo_expired_at": T0 + timedelta(minutes=20), "api_expired_at": T0 + timedelta(minutes=10)}
    assert project(due, []).session["status"] == "active"  # no clock, no report: not expired
    assert project(due, [], now=T0 + timedelta(minutes=30)).session["status"] == "active"  # not before its time
    assert project(due, [timeout], now=T0 + timedelta(minutes=31)).session["expired_at"] == T0 + timedelta(minutes=30)
    for name, at in reports.items():
        session = project(replace(RECORD, **{name: at}), [timeout]).session
        assert (session["status"], session["expired_at"]) == ("expired", at)
    session = project(replace(due, **reports), [timeout], now=T0 + timedelta(hours=1)).session
    assert (session["status"], session["expired_at"]) == ("expired", T0 + timedelta(minutes=10))

    used = CallbackFact(session_uuid="s-1", kind="pin", event_name="SessionFirstPartyPinAuthenticated",
                        at=T0 + timedelta(minutes=5))
    for plivo, latest in ((T0 + timedelta(minutes=7), T0 + timedelta(minutes=7)), (T0, T0 + timedelta(minutes=5))):
        record = replace(RECORD, plivo_last_interaction_at=plivo)
        assert project(record, [used]).session["last_interaction_at"] == latest
        assert project(replace(record, last_interaction_at=T0 + timedelta(hours=1)), [used]
                       ).session["last_interaction_at"] == T0 + timedelta(hours=1)  # never back
