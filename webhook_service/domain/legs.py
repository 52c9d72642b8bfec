"""Call legs as a pure function of a session's facts, so arrival order cannot matter.

Facts are the callbacks' leg events (one per party, phase and time, merged by `domain.projection`)
and Plivo's own interaction records (reconciliation's). The legs are re-derived from all of them
whenever one changes:

1. Plivo's masking callbacks carry no call UUID, so a leg is known by its party and its end:
   each terminal event (Hangup, Complete, Failed) ends one leg and carries its billing.
2. Each of Plivo's interactions names the call UUID of each party's leg. A callback leg of that
   party ending within the interaction (± `MATCH_WINDOW`) is that leg: it gets the call UUID.
   A leg Plivo says connected is answered (at the interaction's start, if no Answer callback came).
   A leg Plivo knows and no callback reported is added from the interaction (`source` =
   'reconcile'); the interaction's billing, less what the callback legs of that call carry,
   goes to the first such leg, so the totals match Plivo's and nothing is counted twice.
3. An earlier event of a party (Initiated, Ring, Answer) belongs to the leg with the earliest end
   at or after it, or to the party's one open leg if no leg has ended since. The calls of one
   party do not overlap, so this assignment is right for any arrival order.

Both searches are binary searches over a party's ends sorted by time, so a session with a thousand
calls derives in milliseconds.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from .vocabulary import PARTIES

MATCH_WINDOW = timedelta(seconds=10)
PHASE_COLUMNS = {"initiated": "initiated_at", "ringing": "ringing_at", "answered": "answered_at"}
BILLING = ("end_event", "duration", "billed_duration", "amount", "hangup_cause", "hangup_cause_code")
LEG_FIELDS = ("call_uuid", *BILLING, "from_number", "to_number")
LEG_COLUMNS = ("party", "initiated_at", "ringing_at", "answered_at", "ended_at", *LEG_FIELDS, "source")
# Plivo's interaction statuses for a leg that connected (others: no-answer, busy, failed, …).
ANSWERED_STATUSES = {"completed", "answered", "in-progress"}


@dataclass
class _Leg:
    party: str
    end: dict[str, Any] | None = None  # the terminal fact (a callback's, or one made from an interaction)
    phases: list[Mapping[str, Any]] = field(default_factory=list)

    @property
    def ended_at(self) -> datetime | None:
        return self.end["at"] if self.end else None

    def row(self) -> dict[str, Any]:
        firsts: dict[str, datetime] = {}  # the earliest time of each phase
        for phase in self.phases:
            kind, at = phase["kind"], phase["at"]
            if kind not in firsts or at < firsts[kind]:
                firsts[kind] = at
        row: dict[str, Any] = {"party": self.party}
        for kind, column in PHASE_COLUMNS.items():
            row[column] = firsts.get(kind)
        row["ended_at"] = self.ended_at
        if row["answered_at"] is None and self.end is not None:
            row["answered_at"] = self.end.get("answered_at")  # Plivo's start time for a connected leg
        # The first fact that knows the value: the terminal one, then by time (and kind, for ties).
        phases = sorted(self.phases, key=_by_time_and_kind) if len(self.phases) > 1 else self.phases
        facts = [self.end, *phases] if self.end else phases
        for name in LEG_FIELDS:
            row[name] = None
            for fact in facts:
                value = fact.get(name)
                if value is not None:
                    row[name] = value
                    break
        row["source"] = self.end.get("source", "callback") if self.end else "callback"
        return row


def _by_time_and_kind(fact: Mapping[str, Any]) -> tuple:
    return fact["at"], fact["kind"]


def _from_interaction(interaction: Mapping[str, Any], party: str, billing: tuple[int, Decimal] | None
                      ) -> dict[str, Any]:
    status = (interaction.get(f"{party}_status") or "").lower()
    connected = status in ANSWERED_STATUSES
    return {
        "kind": "ended", "at": interaction["ended_at"], "source": "reconcile",
        "call_uuid": interaction.get(f"{party}_call_uuid"),
        "end_event": "complete" if connected or not status else "failed",
        "answered_at": interaction["started_at"] if connected else None,
        "billed_duration": billing[0] if billing else 0,
        "amount": billing[1] if billing else Decimal(0),
        "hangup_cause": status or None,
    }


def _match_interactions(ends: dict[str, list[dict[str, Any]]], interactions: Iterable[Mapping[str, Any]]
                        ) -> dict[str, list[dict[str, Any]]]:
    """Give callback ends their interaction's call UUID; return the ends made for legs no callback reported."""
    times = {party: [e["at"] for e in ends[party]] for party in PARTIES}
    claimed: set[tuple[str, int]] = set()  # (party, index in its ends)
    made: dict[str, list[dict[str, Any]]] = {party: [] for party in PARTIES}
    for interaction in sorted(interactions, key=lambda i: i["started_at"]):
        if interaction.get("ended_at") is None:
            continue  # the call is still going on: its legs will end in callbacks or a later run
        low, high = interaction["started_at"] - MATCH_WINDOW, interaction["ended_at"] + MATCH_WINDOW
        known_billed, known_amount, missing = 0, Decimal(0), []
        for party in PARTIES:
            call_uuid = interaction.get(f"{party}_call_uuid")
            if not call_uuid:
                continue  # that party's leg was never dialled
            window = range(bisect_left(times[party], low), bisect_right(times[party], high))
            near = [i for i in window if (party, i) not in claimed]
            if near:
                index = min(near, key=lambda i: abs(times[party][i] - interaction["ended_at"]))
                claimed.add((party, index))
                leg_end = ends[party][index]
                leg_end["call_uuid"] = leg_end.get("call_uuid") or call_uuid
                if (interaction.get(f"{party}_status") or "").lower() in ANSWERED_STATUSES:
                    # Plivo says it connected: answered, even if the Answer callback was lost.
                    leg_end.setdefault("answered_at", interaction["started_at"])
                known_billed += leg_end.get("billed_duration") or 0
                known_amount += leg_end.get("amount") or Decimal(0)
            else:
                missing.append(party)
        for i, party in enumerate(missing):
            billing = None
            if i == 0:
                billing = (max((interaction.get("billed_duration") or 0) - known_billed, 0),
                           max((interaction.get("amount") or Decimal(0)) - known_amount, Decimal(0)))
            made[party].append(_from_interaction(interaction, party, billing))
    return made


def build_legs(events: Iterable[Mapping[str, Any]], interactions: Iterable[Mapping[str, Any]] = ()
               ) -> list[dict[str, Any]]:
    """A session's legs from its leg events and Plivo interactions (a pure function).

    Each event is a dict with `party`, `kind` (its phase), `at` and the leg's facts (LEG_FIELDS);
    each interaction one of Plivo's `interaction[]` entries as stored.
    """
    events = list(events)
    ends: dict[str, list[dict[str, Any]]] = {
        party: sorted((dict(e) for e in events if e["party"] == party and e["kind"] == "ended"),
                      key=lambda e: e["at"])
        for party in PARTIES
    }
    made = _match_interactions(ends, interactions)

    legs: list[_Leg] = []
    for party in PARTIES:
        party_legs = [_Leg(party, end) for end in sorted(ends[party] + made[party], key=lambda e: e["at"])]
        end_times = [leg.ended_at for leg in party_legs]
        open_leg = _Leg(party)
        for phase in (e for e in events if e["party"] == party and e["kind"] != "ended"):
            index = bisect_left(end_times, phase["at"])  # the earliest end at or after the phase
            (party_legs[index] if index < len(party_legs) else open_leg).phases.append(phase)
        legs += party_legs + ([open_leg] if open_leg.phases else [])
    return [leg.row() for leg in legs]
