"""A session, derived from its facts: the one place every rule about call activity lives.

`project(record, facts, interactions)` is a pure function of

* the session's own record (what the API and reconciliation stored: parties, original number,
  when it is due to expire, and what Plivo and the API reported about its end and its last use),
* its callbacks' facts (`domain.callbacks.CallbackFact`, one per callback, as reported), and
* Plivo's interaction records (reconciliation's facts),

and the time it is projected (`now`: a session past its expiry is expired), and returns
everything the projector writes: call legs, recordings, the number history, the
counters, status, parties and current number, and the activity per day the daily totals are kept
from. Facts are a set: the same fact twice, or the facts in any order, give the same projection,
so redeliveries, replays and reshuffles cannot change a total. Where two facts disagree on a value
the earlier one wins (by event time, then `SequenceNumber`, then content), never the later arrival.

Rules that only move one way merge with what the record holds: an expired session stays expired
(at the earliest time anyone reported: a SessionTimeout callback, Plivo, the API, or the expiry
time once passed), the last interaction only moves later (ours or Plivo's), parties learnt from
callbacks only fill what the API left empty. Those who report (reconciliation, the API) store what
they were told in the record's input columns and never write these outcomes themselves.

A busy session is projected again every few tenths of a second while its calls go on, each time
with a few more facts among thousands. Given its previous projection and the earliest time of any
fact added or replaced since (`Since`), `project` re-derives only the legs that can have changed:
a party's legs that ended before that time keep their rows, since no fact of theirs changed (see
`_legs_since` for when that holds); the rest is derived as always. The result is the same
projection (`tests/test_projection.py` holds the two equal for any split and order of the facts).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from operator import attrgetter, itemgetter
from typing import Any

from .activity import counters, session_activity_of
from .callbacks import CallbackFact
from .legs import BILLING, LEG_FIELDS, MATCH_WINDOW, build_legs
from .vocabulary import PARTIES

# Facts that mean someone used the session (not its timeout, not Plivo's number swap).
INTERACTION_KINDS = {"leg", "pin", "call_done"}
# A leg's values that only its end carries; the others, that any of its events may.
_BILLING_ONLY = set(BILLING)
_NOT_BILLING = tuple(name for name in LEG_FIELDS if name not in _BILLING_ONLY)
_NO_BILLING = dict.fromkeys(_BILLING_ONLY)
_values = attrgetter(*LEG_FIELDS)  # a fact's leg values, in LEG_FIELDS' order
RECORDING_RANK = {"initiated": 1, "failed": 2, "completed": 3}
RECORDING_FIELDS = ("recording_url", "resource_url", "duration", "format", "started_at", "ended_at")
# The session's columns a projection writes.
SESSION_FIELDS = ("call_count", "answered_call_count", "billed_duration", "amount", "recording_count", "status",
                  "expired_at", "first_party", "second_party", "virtual_number", "virtual_number_changed_at",
                  "last_interaction_at")


@dataclass(frozen=True)
class SessionRecord:
    """What the API and reconciliation stored about a session: the projection's own inputs."""

    session_uuid: str
    status: str
    expired_at: datetime | None
    first_party: str | None
    second_party: str | None
    original_virtual_number: str | None
    virtual_number: str | None
    last_interaction_at: datetime | None
    created_at: datetime
    plivo_created_at: datetime | None = None
    expires_at: datetime | None = None  # when it is due to expire
    plivo_expired_at: datetime | None = None  # Plivo said it expired, at this time
    api_expired_at: datetime | None = None  # our API expired it on Plivo, at this time
    plivo_last_interaction_at: datetime | None = None  # Plivo's last interaction, last read


@dataclass
class Projection:
    """A session as its facts make it."""

    session: dict[str, Any]  # SESSION_FIELDS
    legs: list[dict[str, Any]]  # legs.LEG_COLUMNS
    recordings: list[dict[str, Any]]  # recording_uuid, status, RECORDING_FIELDS, reported_at
    numbers: list[tuple[str, datetime]]  # (virtual number, when it took effect), oldest first
    activity: dict[date, dict[str, Any]] = field(default_factory=dict)
    # By party: its legs that ended at or before this time are those of the previous projection
    # (`Since`), unchanged; None: every leg was derived afresh.
    kept_legs_until: dict[str, datetime] | None = field(default=None, compare=False)


class FactLog:
    """A session's facts in time order, kept between projections: facts are added and replaced, and
    those after a given time are one slice."""

    __slots__ = ("facts", "times")

    def __init__(self, facts: Iterable[CallbackFact] = ()):
        self.facts: list[CallbackFact] = sorted(facts, key=_at)
        self.times: list[datetime] = [fact.at for fact in self.facts]

    def __len__(self) -> int:
        return len(self.facts)

    def add(self, fact: CallbackFact) -> None:
        index = bisect_right(self.times, fact.at)
        self.facts.insert(index, fact)
        self.times.insert(index, fact.at)

    def remove(self, fact: CallbackFact) -> None:
        index = self.facts.index(fact, bisect_left(self.times, fact.at), bisect_right(self.times, fact.at))
        del self.facts[index], self.times[index]

    def after(self, moment: datetime) -> list[CallbackFact]:
        """The facts later than `moment`."""
        return self.facts[bisect_right(self.times, moment):]

    def first(self, name: str, where: Any = None) -> Any:
        """The value of `name` in the first fact (in canonical order) that has one (and passes `where`)."""
        for index, fact in enumerate(self.facts):
            if getattr(fact, name) is not None and (where is None or where(fact)):
                at = fact.at
                tied = [f for f in self.facts[index:bisect_right(self.times, at)]
                        if getattr(f, name) is not None and (where is None or where(f))]
                return getattr(canonical(tied)[0], name)
        return None


@dataclass(frozen=True)
class Since:
    """A session's previous projection, what it was derived from that is not a fact, and the
    earliest time of any fact added or replaced after it (None: no fact changed)."""

    projection: Projection
    interactions: tuple[Mapping[str, Any], ...]
    changed_from: datetime | None


_first_item = itemgetter(0)
_at = attrgetter("at")


def _order(fact: CallbackFact) -> tuple:
    return (fact.at, fact.sequence_number is None, fact.sequence_number or 0)


def canonical(facts: Iterable[CallbackFact]) -> list[CallbackFact]:
    """Facts in one order whatever order they came in: by time, `SequenceNumber`, then content."""
    keyed = sorted(((_order(fact), fact) for fact in facts), key=_first_item)
    ordered = [fact for _, fact in keyed]
    i = 0
    while i < len(keyed):  # ties on (time, sequence) are rare: order those by their whole content
        j = i + 1
        while j < len(keyed) and keyed[j][0] == keyed[i][0]:
            j += 1
        if j - i > 1:
            ordered[i:j] = sorted(ordered[i:j], key=lambda f: tuple(map(repr, f)))
        i = j
    return ordered


def _first(facts: Sequence[CallbackFact], name: str) -> Any:
    return next((getattr(f, name) for f in facts if getattr(f, name) is not None), None)


def leg_events(facts: Sequence[CallbackFact], first_party: str | None, second_party: str | None
               ) -> list[dict[str, Any]]:
    """The leg facts as `build_legs` takes them: one per party, phase and time.

    The caller that only the latest vocabulary's SessionVirtualNumberAnswer names (by number) is
    matched to a party by the session's numbers or the callback's own. Billing counts on a leg's
    end only (Plivo lists the billing fields on every event; reference §8.2). Facts about the same
    party, phase and time are one event whose values are the first known, in canonical order.
    """
    events: dict[tuple[str, str, datetime], dict[str, Any]] = {}
    for fact in facts:
        if fact.kind != "leg" or fact.phase is None:
            continue
        party = fact.party
        if party is None and fact.from_number:
            if fact.from_number in (fact.first_party, first_party):
                party = "first"
            elif fact.from_number in (fact.second_party, second_party):
                party = "second"
        if party is None:
            continue
        key = (party, fact.phase, fact.at)
        event = events.get(key)
        if event is None:
            event = events[key] = {"party": party, "kind": fact.phase, "at": fact.at}
            event.update(zip(LEG_FIELDS, _values(fact), strict=True))
            if fact.phase != "ended":
                event.update(_NO_BILLING)
        else:
            names = LEG_FIELDS if fact.phase == "ended" else _NOT_BILLING
            for name in names:
                value = getattr(fact, name)
                if event[name] is None and value is not None:
                    event[name] = value
    return list(events.values())


def recordings_of(facts: Sequence[CallbackFact], interactions: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each recording from its callbacks and Plivo's interactions.

    Its status is the furthest any fact reached (completed > failed > initiated); each value comes
    from the furthest-reaching fact that has it, and Plivo's record fills what no callback sent.
    """
    by_uuid: dict[str, list[CallbackFact]] = {}
    for fact in facts:
        if fact.kind == "recording" and fact.recording_uuid and fact.recording_status:
            by_uuid.setdefault(fact.recording_uuid, []).append(fact)
    listed = {i["recording_uuid"]: i for i in interactions if i.get("recording_uuid") and i.get("ended_at")}
    recordings = []
    for uuid in sorted(set(by_uuid) | set(listed)):
        news = sorted(by_uuid.get(uuid, ()), key=lambda f: -RECORDING_RANK[f.recording_status])  # stable
        interaction = listed.get(uuid)
        statuses = [f.recording_status for f in news] + (["completed"] if interaction else [])
        values = {
            "recording_url": _first(news, "recording_url"),
            "resource_url": _first(news, "recording_resource_url"),
            "duration": _first(news, "recording_duration"),
            "format": _first(news, "recording_format"),
            "started_at": _first(news, "recording_started_at"),
            "ended_at": _first(news, "recording_ended_at"),
        }
        reported = [f.at for f in news]
        if interaction:  # a recording whose callbacks never came: Plivo lists it once the call is over
            for name, value in (("resource_url", interaction.get("recording_resource_url")),
                                ("started_at", interaction["started_at"]), ("ended_at", interaction["ended_at"])):
                if values[name] is None:
                    values[name] = value
            reported.append(interaction["started_at"])
        recordings.append({"recording_uuid": uuid, "status": max(statuses, key=RECORDING_RANK.__getitem__),
                           **values, "reported_at": min(reported)})
    return recordings


def numbers_of(record: SessionRecord, facts: FactLog) -> tuple[str | None, datetime | None, list[tuple[str, datetime]]]:
    """The current virtual number, when it last changed, and every number the session has had
    (empty if it was never replaced). The newest replacement wins, whatever order they came in."""
    replacements = sorted({(f.at, f.virtual_number) for f in facts.facts if f.kind == "number" and f.virtual_number})
    original = record.original_virtual_number or facts.first("virtual_number", _not_a_number_change)
    if not replacements:
        return original or record.virtual_number, None, []
    history: list[tuple[str, datetime]] = []
    if original:
        since = record.plivo_created_at or record.created_at
        earliest = next((f.at for f in facts.facts if f.kind != "number"), None)
        if earliest is not None:
            since = min(since, earliest)
        history.append((original, since))
    history += [(number, at) for at, number in replacements]
    history = sorted(dict.fromkeys(history), key=lambda h: h[1])
    changed_at, current = replacements[-1]
    return current, changed_at, history


def _not_a_number_change(fact: CallbackFact) -> bool:
    return fact.kind != "number"


def ends_reported(record: SessionRecord, facts: FactLog, now: datetime | None) -> list[datetime]:
    """Every time anyone said the session ended: its SessionTimeout callbacks, Plivo, the API, and
    its expiry time once `now` has passed it (none of that with `now` None)."""
    ends = [f.at for f in facts.facts if f.kind == "timeout"]
    ends += [t for t in (record.plivo_expired_at, record.api_expired_at) if t is not None]
    if now is not None and record.expires_at is not None and record.expires_at < now:
        ends.append(record.expires_at)
    return ends


def project(record: SessionRecord, facts: Iterable[CallbackFact] | FactLog,
            interactions: Sequence[Mapping[str, Any]] = (), since: Since | None = None,
            now: datetime | None = None) -> Projection:
    """The session as its record, facts and Plivo's interactions make it at `now` (see the module
    docstring; without `now`, the expiry time does not expire it).

    With `since` (and `facts` the same `FactLog` the previous projection read, with the changes
    folded in), only the legs that can have changed are derived again.
    """
    log = facts if isinstance(facts, FactLog) else FactLog(facts)
    first_party = record.first_party or log.first("first_party")
    second_party = record.second_party or log.first("second_party")
    kept = _legs_since(since, log, first_party, second_party, interactions) if since is not None else None
    if kept is None:
        legs = build_legs(leg_events(canonical(log.facts), first_party, second_party), interactions)
    else:
        legs, kept_until = kept
    recordings = recordings_of(canonical(f for f in log.facts if f.kind == "recording"), interactions)
    activity = session_activity_of(legs, recordings)
    virtual_number, changed_at, numbers = numbers_of(record, log)

    ends = ends_reported(record, log, now)
    expired = record.status == "expired" or bool(ends)
    ended = [t for t in (record.expired_at, *ends) if t is not None]
    used = next((f.at for f in reversed(log.facts) if f.kind in INTERACTION_KINDS), None)  # the latest
    last = max([t for t in (record.last_interaction_at, record.plivo_last_interaction_at, used) if t is not None],
               default=None)
    session = counters(activity) | {
        "status": "expired" if expired else record.status,
        "expired_at": min(ended) if expired and ended else record.expired_at,
        "first_party": first_party,
        "second_party": second_party,
        "virtual_number": virtual_number,
        "virtual_number_changed_at": changed_at,
        "last_interaction_at": last,
    }
    return Projection(session=session, legs=legs, recordings=recordings, numbers=numbers, activity=activity,
                      kept_legs_until=kept_until if kept is not None else None)


def _legs_since(since: Since, log: FactLog, first_party: str | None, second_party: str | None,
                interactions: Sequence[Mapping[str, Any]]
                ) -> tuple[list[dict[str, Any]], dict[str, datetime]] | None:
    """The legs, deriving again only those that can differ from `since`'s; None: derive them all.

    Let `t` be the earliest time of a fact added or replaced since. For each party, let `cut` be
    the end of its last leg that ended before `t`. Its legs that ended by `cut` are unchanged: a
    leg is its end event and its other events after the party's previous end (`domain.legs`), and
    no fact at or before `cut` changed. The party's later events (the facts after `cut`, merged
    as `leg_events` merges them: all facts of one event share its time) give its other legs.

    That holds while what is not a fact is the same: the parties that facts are matched to, and
    Plivo's interactions, each of which ended (with its matching window) before `t`, so that it
    matched and made only kept legs (every leg derived again ends at or after `t`). Otherwise, or
    if a party has no leg ended before `t`, every leg is derived again.
    """
    previous = since.projection
    if (previous.session["first_party"], previous.session["second_party"]) != (first_party, second_party):
        return None
    if tuple(interactions) != since.interactions:
        return None
    changed_from = since.changed_from
    cut: dict[str, datetime] = {}
    kept: dict[str, list[dict[str, Any]]] = {party: [] for party in PARTIES}
    for leg in previous.legs:
        end = leg["ended_at"]
        if end is not None and (changed_from is None or end < changed_from):
            party = leg["party"]
            kept[party].append(leg)
            if party not in cut or end > cut[party]:
                cut[party] = end
    if len(cut) < len(PARTIES):
        return None
    if changed_from is not None and any(i.get("ended_at") is not None and i["ended_at"] + MATCH_WINDOW >= changed_from
                                        for i in interactions):
        return None
    earliest_cut = min(cut.values())
    events = [event for event in leg_events(canonical(log.after(earliest_cut)), first_party, second_party)
              if event["at"] > cut[event["party"]]]
    derived = build_legs(events)
    legs = []
    for party in PARTIES:
        legs += kept[party] + [leg for leg in derived if leg["party"] == party]
    return legs, cut
