"""The sandbox's state: sessions, the number pool, fault rules, the request log and a clock.

One `threading.Lock` guards it all. Every public method takes the lock itself, so Flask views (on
many threads) and in-process test code can call them directly. Callbacks are built under the lock but
delivered after it is released, so a receiver may call back into the sandbox while handling one.
"""

from __future__ import annotations

import logging
import operator
import secrets
import string
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

from plivo_sandbox import calls
from plivo_sandbox.models import DEFAULTS, PIN_DEFAULTS, Session, country_code, expiry_seconds
from plivo_sandbox.validation import (
    PHONE_RE,
    ApiError,
    invalid,
    list_filters,
    validate_create,
    validate_update,
)
from webhook_service.domain.plivo_parameters import PARAMETERS

log = logging.getLogger(__name__)
# The sandbox account's one subaccount (auth ID -> auth token), for sessions created with `subaccount`.
SANDBOX_SUBACCOUNTS = {"SASANDBOX00000000000": "sandbox-subaccount-token"}
# The countries of the default number pool, each with a number its pool's numbers are made from (the
# last digits counting up from it): fictional or example numbers, never a real person's.
POOL_COUNTRIES = {
    "US": "16505550100", "GB": "447700900100", "FR": "33612345600", "DE": "4915123456700", "ES": "34612345600",
    "IT": "393123456700", "NL": "31612345600", "IN": "919812345600", "AU": "61412345600", "SG": "6581234500",
    "BR": "5511961234500", "MX": "5212221234500", "JP": "819012345600",
}
DEFAULT_POOL_SIZE = 100  # numbers per country
POOL_EXHAUSTED = "Number pool exhausted or not available"
ALREADY_EXPIRED = "Session already expired"
FAULT_DEFAULTS: dict[str, Any] = {
    "method": None,  # e.g. "POST"; None matches any
    "path_contains": None,  # substring of the request path (without the query); None matches any
    "status": None,  # answer with this status instead; None: only delay
    "body": None,  # JSON body of that answer (a JSON string is sent as text/plain); default: a Plivo-style error
    "delay": 0,  # seconds to hold the request before answering (`release_held` ends every hold at once)
    "retry_after": None,  # Retry-After header value
    "times": None,  # how many requests it applies to; None: unlimited
    "after_effect": False,  # perform the operation first, then delay/answer (outcome-unknown timeouts)
    "reset": False,  # close the connection without answering (after the delay; the client sees it dropped)
}
FAULT_CHECKS: dict[str, Callable[[Any], bool]] = {
    "method": lambda v: v is None or isinstance(v, str),
    "path_contains": lambda v: v is None or isinstance(v, str),
    "status": lambda v: v is None or (_is_int(v) and 100 <= v <= 599),
    "body": lambda v: True,
    "delay": lambda v: (_is_int(v) or isinstance(v, float)) and 0 <= v <= 300,
    "retry_after": lambda v: v is None or isinstance(v, str) or _is_int(v),
    "times": lambda v: v is None or (_is_int(v) and v >= 1),
    "after_effect": lambda v: isinstance(v, bool),
    "reset": lambda v: isinstance(v, bool),
}
OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "": operator.eq,
    "__gt": operator.gt,
    "__gte": operator.ge,
    "__lt": operator.lt,
    "__lte": operator.le,
}


class SandboxState:
    """Everything the sandbox remembers, behind one lock."""

    def __init__(self, auth_id: str, auth_token: str, pool: list[str] | None = None,
                 subaccounts: Mapping[str, str] | None = None, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        self.auth_id = auth_id
        self.auth_token = auth_token
        self.subaccounts = dict(SANDBOX_SUBACCOUNTS if subaccounts is None else subaccounts)
        # Whether the create answer's session object shows Plivo's generated PINs: not documented
        # (reference §6.2 lists them on the session object). By default it does not, the reading that
        # makes a client fetch the session; tests set it to play the other reading.
        self.pins_in_create_answer = False
        # The virtual numbers by country calling code: `pool`, or `pool_size` numbers in each of
        # POOL_COUNTRIES. With geomatch (Plivo's default) a session's number comes from its first
        # party's country ("searches the pool by country code", reference §3).
        self.pools: dict[int | None, list[str]] = {}
        for number in pool or default_pool(pool_size):
            match = PHONE_RE.fullmatch(number)
            if not match:
                raise ValueError(f"pool number {number!r} is not 8 to 15 digits")
            self.pools.setdefault(country_code(match.group(1)), []).append(match.group(1))
        self.lock = threading.Lock()
        # Requests held by a fault's delay wait on `_gate`; `release_held` opens it (and sets a new one).
        self._hold_changed = threading.Condition(self.lock)
        self._gate = threading.Event()
        self._holding = 0
        self._sessions: dict[str, Session] = {}
        self._faults: list[dict[str, Any]] = []
        self._requests: list[dict[str, Any]] = []
        self._clock_offset = timedelta(0)

    def now(self) -> datetime:
        """The sandbox's current time (UTC): the wall clock plus any `advance_clock` offset."""
        return datetime.now(UTC) + self._clock_offset

    # Masking Session API ------------------------------------------------------------------------

    def create(self, body: Any) -> dict[str, Any]:
        """Create a session from a create request body; return the session object."""
        values = validate_create(body)
        if "subaccount" in values and values["subaccount"] not in self.subaccounts:
            # Plivo's wording for this case is not documented; the sandbox uses its "Invalid parameter." form.
            raise invalid("subaccount is not a subaccount of this account")
        with self.lock:
            now = self.now()
            first, second = values.pop("first_party", ""), values.pop("second_party", "")
            expiry = now + timedelta(seconds=expiry_seconds(values.pop("session_expiry", None)))
            geomatch = values.pop("geomatch", PARAMETERS["geomatch"].default)  # not shown on the session object
            config = dict(DEFAULTS)
            if values.get("is_pin_authentication_required"):
                config.update(PIN_DEFAULTS)
            if values.get("generate_pin"):
                length = values.setdefault("generate_pin_length", PARAMETERS["generate_pin_length"].default)
                values["first_party_pin"], values["second_party_pin"] = _two_pins(length)
            config.update(values)
            number = self._allocate({first, second} - {""}, now, country=country_code(first or second),
                                    geomatch=geomatch)
            session = Session(str(uuid4()), first, second, number, now, now, expiry, config, geomatch=geomatch)
            self._sessions[session.session_uuid] = session
            answer = session.to_json(now)
            if values.get("generate_pin") and not self.pins_in_create_answer:
                answer["first_party_pin"] = answer["second_party_pin"] = None
            return answer

    def get(self, session_uuid: str) -> dict[str, Any]:
        """The session object; ApiError(404) if unknown."""
        with self.lock:
            return self._session(session_uuid).to_json(self.now())

    def update(self, session_uuid: str, body: Any) -> dict[str, Any]:
        """Apply an update request body (§4); `session_expiry` counts from now."""
        with self.lock:
            session = self._session(session_uuid)
            now = self.now()
            if session.status(now) == "expired":
                raise ApiError(400, ALREADY_EXPIRED)
            single = bool(session.config["create_session_with_single_party"])
            values = validate_update(body, session_uuid, single)
            first = values.pop("first_party", session.first_party)
            second = values.pop("second_party", session.second_party)
            if first == second:
                raise invalid("first_party and second_party must be different")
            parties = {first, second} - {""}
            if parties != session.parties() and self._conflict(session.virtual_number, parties, now, session):
                raise invalid("a party is already in another active session on this virtual number")
            if "session_expiry" in values:
                session.expiry_time = now + timedelta(seconds=expiry_seconds(values.pop("session_expiry")))
            session.first_party, session.second_party = first, second
            session.config.update(values)
            session.modified_time = now
            return session.to_json(now)

    def expire(self, session_uuid: str) -> None:
        """Expire a session now (Plivo's DELETE marks it expired; nothing is deleted)."""
        with self.lock:
            session = self._session(session_uuid)
            now = self.now()
            if session.status(now) == "expired":
                raise ApiError(400, ALREADY_EXPIRED)
            session.expiry_time = session.modified_time = now
            # Whether Plivo sends SessionTimeout for a session expired by DELETE is not documented (the
            # callback page says only that it comes when the session expires). The sandbox sends none,
            # the reading a client must survive: the service records the expiry itself on DELETE.
            session.timeout_sent = True

    def expire_due(self) -> int:
        """Send `SessionTimeout` for every session whose expiry time has passed since the last call, as
        Plivo does by itself when a session runs out; returns how many. The sandbox's server calls this
        every second (sessions running out on the wall clock), and `POST /sandbox/clock` right after
        moving the clock. The callback is dated at the session's expiry, not at the sweep."""
        with self.lock:
            now = self.now()
            callbacks: list[calls.Callback] = []
            due = [s for s in self._sessions.values() if not s.timeout_sent and s.status(now) == "expired"]
            for session in sorted(due, key=lambda s: s.expiry_time):
                session.timeout_sent = True
                callbacks += calls.session_event(session, "SessionTimeout", session.expiry_time, calls.Delivery(),
                                                 self._tokens(session))
        calls.deliver(callbacks)
        return len(due)

    def list(self, args: Mapping[str, str]) -> tuple[int, list[dict[str, Any]], int, int]:
        """Sessions matching list query `args`, newest first: (total_count, page, limit, offset)."""
        with self.lock:
            now = self.now()
            filters, limit, offset = list_filters(args, now)
            matches = [s for s in reversed(self._sessions.values()) if _matches(s, filters, now)]
            matches.sort(key=lambda s: s.created_time, reverse=True)  # stable: ties stay newest first
            page = [
                {**s.to_json(now), "resource_uri": f"/v1/Account/{self.auth_id}/Masking/Session/{s.session_uuid}/"}
                for s in matches[offset : offset + limit]
            ]
            return len(matches), page, limit, offset

    # Control API ----------------------------------------------------------------------------------

    def play_call(self, session_uuid: str, body: dict[str, Any]) -> dict[str, Any]:
        """Play a call through a session, deliver its callbacks unless told not to; see `calls.play_call`."""
        with self.lock:
            session = self._live_session(session_uuid)
            options = calls.parse_call_options(body, session)
            now = self.now()
            callbacks = calls.play_call(session, options, now, self.auth_id, self._tokens(session))
            snapshot = session.to_json(now)
        return _delivered(callbacks, snapshot, options.delivery)

    def initiated_call(self, session_uuid: str) -> None:
        """The call Plivo starts by itself on creating a session with `initiate_call_to_first_party`: the
        first party dialled at once, then the second (answered, 30 s of talk); its callbacks delivered."""
        try:
            self.play_call(session_uuid, {"initiated": True})
        except ApiError as exc:  # expired or gone (reset) before the call could start
            log.info("sandbox: no initiated call for a session: %s", exc.message)

    def timeout(self, session_uuid: str, body: dict[str, Any]) -> dict[str, Any]:
        """Expire a session now and send `SessionTimeout`, as Plivo does when a session runs out."""
        with self.lock:
            session = self._live_session(session_uuid)
            delivery = calls.parse_delivery(body)
            now = self.now()
            session.expiry_time = session.modified_time = now
            session.timeout_sent = True
            callbacks = calls.session_event(session, "SessionTimeout", now, delivery, self._tokens(session))
            snapshot = session.to_json(now)
        return _delivered(callbacks, snapshot, delivery)

    def replace_number(self, session_uuid: str, body: dict[str, Any]) -> dict[str, Any]:
        """Move a session to another free pool number and send `SessionVirtualNumberReplaced` (new number)."""
        with self.lock:
            session = self._live_session(session_uuid)
            delivery = calls.parse_delivery(body)
            now = self.now()
            try:
                number = self._allocate(session.parties(), now, moving=session, country=session.country,
                                        geomatch=session.geomatch)
            except ApiError:
                raise ApiError(409, "no other pool number is free for this session") from None
            session.virtual_number, session.modified_time = number, now
            callbacks = calls.session_event(session, "SessionVirtualNumberReplaced", now, delivery,
                                            self._tokens(session))
            snapshot = session.to_json(now)
        return _delivered(callbacks, snapshot, delivery)

    def advance_clock(self, seconds: float) -> datetime:
        """Move the sandbox's clock forward (to let sessions expire without waiting); return the new now.
        (The sessions that ran out meanwhile get their SessionTimeout from `expire_due`.)"""
        with self.lock:
            self._clock_offset += timedelta(seconds=seconds)
            return self.now()

    def add_faults(self, rules: Any) -> list[dict[str, Any]]:
        """Append fault rules (a list of objects, see FAULT_DEFAULTS); return all rules."""
        if not isinstance(rules, list):
            raise ApiError(400, "faults must be a JSON list of rule objects")
        checked = [_fault_rule(rule) for rule in rules]
        with self.lock:
            self._faults.extend(checked)
            return [dict(rule) for rule in self._faults]

    def faults(self) -> list[dict[str, Any]]:
        """The fault rules still in force (with the `times` left)."""
        with self.lock:
            return [dict(rule) for rule in self._faults]

    def clear_faults(self) -> None:
        """Remove every fault rule."""
        with self.lock:
            self._faults.clear()

    def take_fault(self, method: str, path: str) -> dict[str, Any] | None:
        """The first rule matching an API request (counting it against `times`), or None."""
        with self.lock:
            for rule in self._faults:
                if rule["method"] in (None, method) and (rule["path_contains"] or "") in path:
                    if rule["times"] is not None:
                        rule["times"] -= 1
                        if rule["times"] == 0:
                            self._faults.remove(rule)
                    return dict(rule)
            return None

    def hold(self, seconds: float) -> None:
        """Hold a request for a fault's delay: `seconds`, or until `release_held` is called."""
        if seconds <= 0:
            return
        with self._hold_changed:
            gate = self._gate
            self._holding += 1
            self._hold_changed.notify_all()
        try:
            gate.wait(seconds)
        finally:
            with self._hold_changed:
                self._holding -= 1
                self._hold_changed.notify_all()

    def held(self) -> int:
        """How many requests a fault's delay holds now."""
        with self.lock:
            return self._holding

    def wait_held(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until at least `count` requests are held by a delay (False if the timeout passed first)."""
        with self._hold_changed:
            return self._hold_changed.wait_for(lambda: self._holding >= count, timeout)

    def release_held(self) -> int:
        """End the delay of every request held now (they go on at once); returns how many there were."""
        with self.lock:
            released = self._holding
            self._gate.set()
            self._gate = threading.Event()
            return released

    def log_request(self, entry: dict[str, Any]) -> None:
        """Append an API request to the request log."""
        with self.lock:
            self._requests.append(entry)

    def set_request_status(self, entry: dict[str, Any], status: int) -> None:
        """Record the status a logged request was answered with."""
        with self.lock:
            entry["status"] = status

    def request_log(self) -> list[dict[str, Any]]:
        """A copy of the request log, oldest first."""
        with self.lock:
            return [dict(entry) for entry in self._requests]

    def clear_requests(self) -> None:
        """Empty the request log."""
        with self.lock:
            self._requests.clear()

    def reset(self) -> None:
        """Forget all sessions, fault rules and logged requests, release held requests, reset the clock."""
        self.release_held()
        with self.lock:
            self._sessions.clear()
            self._faults.clear()
            self._requests.clear()
            self._clock_offset = timedelta(0)
            self.pins_in_create_answer = False

    # Internals (the caller holds the lock) -------------------------------------------------------

    def _tokens(self, session: Session) -> calls.Tokens:
        # V3 is keyed with the token of the account owning the session, Ma-V3 with the main one's.
        subaccount = session.config.get("subaccount")
        return calls.Tokens(self.subaccounts[subaccount] if subaccount else self.auth_token, self.auth_token)

    def _session(self, session_uuid: str) -> Session:
        session = self._sessions.get(session_uuid)
        if session is None:
            raise ApiError(404, "session not found")
        return session

    def _live_session(self, session_uuid: str) -> Session:
        session = self._session(session_uuid)
        if session.status(self.now()) == "expired":
            raise ApiError(409, ALREADY_EXPIRED)
        return session

    def _conflict(self, number: str, parties: set[str], now: datetime, exclude: Session | None = None) -> bool:
        # Plivo routes a call to a virtual number by the caller's number, so one number may serve many
        # sessions but never two live ones sharing a party. An ended session keeps its parties off its
        # number for virtual_number_cooloff_period seconds more.
        return any(
            s is not exclude and s.virtual_number == number and now < s.blocks_number_until() and parties & s.parties()
            for s in self._sessions.values()
        )

    def _allocate(self, parties: set[str], now: datetime, *, country: int | None, geomatch: bool,
                  moving: Session | None = None) -> str:
        # A number is free for these parties when no live session (or one in its cool-off) on it shares
        # a party: an expired session frees its number at its expiry (plus cool-off), whether it ran
        # out, was expired by DELETE or timed out.
        candidates = list(self.pools.get(country, []))
        if not geomatch:  # any country will do; the party's own first
            candidates += [n for code, numbers in self.pools.items() if code != country for n in numbers]
        for number in candidates:
            if (moving is None or number != moving.virtual_number) and not self._conflict(number, parties, now, moving):
                return number
        raise ApiError(400, POOL_EXHAUSTED)


def default_pool(size: int = DEFAULT_POOL_SIZE) -> list[str]:
    """`size` numbers in each of POOL_COUNTRIES: each country's seed number with its last digits counting up."""
    if size < 1:
        raise ValueError("a pool has at least one number a country")
    width = len(str(size - 1))
    return [seed[:-width] + f"{i:0{width}d}" for seed in POOL_COUNTRIES.values() for i in range(size)]


def _delivered(callbacks: list[calls.Callback], snapshot: dict[str, Any], delivery: calls.Delivery) -> dict[str, Any]:
    if delivery.deliver:
        calls.deliver(callbacks)
    return {"callbacks": callbacks, "session": snapshot}


def _two_pins(length: int) -> tuple[str, str]:
    while True:
        first, second = ("".join(secrets.choice(string.digits) for _ in range(length)) for _ in range(2))
        if first != second:
            return first, second


def _matches(session: Session, filters: list[tuple[str, str, Any]], now: datetime) -> bool:
    fields = {
        "first_party": session.first_party,
        "second_party": session.second_party,
        "virtual_number": session.virtual_number,
        "status": session.status(now),
        "subaccount": session.config.get("subaccount"),
        "created_time": session.created_time,
        "expiry_time": session.expiry_time,
        "duration": session.duration,
    }
    for name, op, value in filters:
        actual = fields[name]
        if isinstance(value, tuple):  # a time and its precision: an exact match compares at that precision
            value, precision = value
            if op == "":
                actual = actual.replace(microsecond=0) if precision == 1 else actual
                actual = actual.replace(second=0, microsecond=0) if precision == 0 else actual
        if not OPERATORS[op](actual, value):
            return False
    return True


def _fault_rule(rule: Any) -> dict[str, Any]:
    if not isinstance(rule, dict):
        raise ApiError(400, "each fault rule must be a JSON object")
    for name, value in rule.items():
        if name not in FAULT_CHECKS:
            raise ApiError(400, f"unknown fault rule field {name!r}")
        if not FAULT_CHECKS[name](value):
            raise ApiError(400, f"invalid fault rule field {name!r}")
    checked = {**FAULT_DEFAULTS, **rule}
    if checked["method"]:
        checked["method"] = checked["method"].upper()
    if checked["retry_after"] is not None:
        checked["retry_after"] = str(checked["retry_after"])
    return checked


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
