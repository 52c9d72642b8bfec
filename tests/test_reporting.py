"""SQL reporting: the `reporting.*` views, the `reporting_reader` role, docs/reporting.md and `flask report`.

The data set goes through the real code path: sessions inserted as the API stores them, then
Plivo callbacks (both vocabularies) stored by `inbox.receive`, as the webhook does once a
callback's signature has verified, and projected by the projector. Every expected value below is
computed by hand from those callbacks.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from alembic import command
from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ProgrammingError

from webhook_service import create_app
from webhook_service.migrate import alembic_config
from webhook_service.persistence.db import sqlalchemy_url
from webhook_service.persistence.models import MaskingSession

from .helpers import FIRST, SECOND, make_settings, settle, store_callback

DOCS = Path(__file__).resolve().parent.parent / "docs" / "reporting.md"
READER = "reporting_reader"

S1 = "11111111-1111-4111-8111-111111111111"  # api, legacy events: an answered and an unanswered call
S2 = "22222222-2222-4222-8222-222222222222"  # api, latest events: an answered call, a failed leg; expired
S3 = "33333333-3333-4333-8333-333333333333"  # discovered by its callbacks: PIN checks, a recorded call
S4 = "44444444-4444-4444-8444-444444444444"  # api, expired without a call
S5 = "55555555-5555-4555-8555-555555555555"  # api, no activity yet
FIRST3, SECOND3 = "+14155550142", "+14155550199"
VN1, VN9, VN2, VN3, VN4, VN5 = ("+14155550001", "+14155550009", "+14155550002", "+14155550003", "+14155550004",
                                "+14155550005")
REC_A = "aaaaaaaa-0000-4000-8000-00000000000a"
REC_C = "cccccccc-0000-4000-8000-00000000000c"
REC_E = "eeeeeeee-0000-4000-8000-00000000000e"
MEDIA_A = f"https://media.plivo.com/v1/Account/MAXXXX/Recording/{REC_A}.mp3"
RESOURCE_A = f"https://api.plivo.com/v1/Account/MAXXXX/Recording/{REC_A}/"
RESOURCE_E = f"https://api.plivo.com/v1/Account/MAXXXX/Recording/{REC_E}/"
NORMAL = {"PlivoHangupCause": "NORMAL_CLEARING", "PlivoHangupCauseCode": "4000"}
NO_ANSWER = {"PlivoHangupCause": "NO_ANSWER", "PlivoHangupCauseCode": "3000"}
BUSY = {"PlivoHangupCause": "USER_BUSY", "PlivoHangupCauseCode": "3010"}
D = Decimal


def t(value: str) -> datetime:
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def billing(duration: int, billed: int, amount: str, cause: dict[str, str]) -> dict[str, str]:
    return {"Duration": str(duration), "BilledDuration": str(billed), "Amount": amount, **cause}


# Data set ----------------------------------------------------------------------------------------


def _api_session(uuid: str, ref: str, vn: str, created: str, expires: str, expiry: int, amount: str) -> dict:
    return {"session_uuid": uuid, "external_ref": ref, "origin": "api", "first_party": FIRST, "second_party": SECOND,
            "virtual_number": vn, "original_virtual_number": vn, "status": "active", "record": True,
            "session_expiry": expiry,
            "create_params": {"first_party": FIRST, "second_party": SECOND, "session_expiry": expiry},
            "created_at": t(created), "plivo_created_at": t(created), "expires_at": t(expires),
            "session_amount": D(amount)}


def _s1_callbacks() -> list[tuple[str, dict]]:
    """Legacy names. Call A (10:00, 2026-11-02): first calls second, who answers; 90 s talk, recorded.
    The number is replaced, then call B (23:59:30, 2026-11-03, ending after midnight): unanswered."""
    def ev(name: str, at: str, vn: str = VN1, **extra: str) -> tuple[str, dict]:
        return "session", {"EventName": name, "EventTimestamp": at, "SessionUUID": S1, "VirtualNumber": vn,
                           "From": FIRST, "To": SECOND, **extra}

    def rec(name: str, at: str, **extra: str) -> tuple[str, dict]:
        return "recording", {"EventName": name, "EventTimestamp": at, "SessionUUID": S1, "VirtualNumber": VN1,
                             "From": FIRST, "To": SECOND, "RecordingUUID": REC_A, "RecordingURL": MEDIA_A,
                             "RecordingResourceURL": RESOURCE_A, "RecordingStartTime": "2026-11-02 10:00:07",
                             "RecordingFormat": ".mp3", **extra}

    first_hangup = ev("SessionFirstPartyHangup", "2026-11-02 10:01:37", **billing(97, 120, "0.01700", NORMAL))
    return [
        ev("SessionFirstPartyAnswer", "2026-11-02 10:00:00", PinAuthenticationStatus="AuthorizedCaller"),
        ev("SessionSecondPartyRing", "2026-11-02 10:00:01"),
        ev("SessionSecondPartyAnswer", "2026-11-02 10:00:07"),
        rec("SessionRecordingInitiated", "2026-11-02 10:00:07"),
        ev("SessionSecondPartyHangup", "2026-11-02 10:01:37", **billing(90, 120, "0.01700", NORMAL)),
        first_hangup,
        rec("SessionRecordingCompleted", "2026-11-02 10:01:37", RecordingDuration="90",
            RecordingEndTime="2026-11-02 10:01:37"),
        first_hangup,  # redelivered: changes nothing
        ("session", {"EventName": "SessionVirtualNumberReplaced", "EventTimestamp": "2026-11-03 07:00:00",
                     "SessionUUID": S1, "VirtualNumber": VN9}),
        ev("SessionFirstPartyAnswer", "2026-11-03 23:59:30", VN9, PinAuthenticationStatus="AuthorizedCaller"),
        ev("SessionSecondPartyRing", "2026-11-03 23:59:31", VN9),
        ev("SessionSecondPartyHangup", "2026-11-04 00:00:16", VN9, **billing(0, 0, "0.00000", NO_ANSWER)),
        ev("SessionFirstPartyHangup", "2026-11-04 00:00:16", VN9, **billing(46, 60, "0.00850", NORMAL)),
        ev("SessionPartiesHangup", "2026-11-04 00:00:16", VN9),
    ]


def _s2_callbacks() -> list[tuple[str, dict]]:
    """Latest names, per-second billing. Call C (12:30, 2026-11-03): second calls first, who answers
    (30 s talk); the recording fails. Call D (00:10, 2026-11-04): first calls second, whose leg fails.
    The session times out at noon."""
    def ev(name: str, at: str, caller: str, callee: str, **extra: str) -> tuple[str, dict]:
        return "session", {"EventName": name, "EventTimestamp": at, "SessionUUID": S2, "VirtualNumber": VN2,
                           "FirstParty": FIRST, "SecondParty": SECOND, "From": caller, "To": callee, **extra}

    return [
        ev("SessionVirtualNumberAnswer", "2026-11-03 12:30:00", SECOND, FIRST),
        ev("SessionFirstPartyInitiated", "2026-11-03 12:30:01", SECOND, FIRST),
        ev("SessionFirstPartyRinging", "2026-11-03 12:30:02", SECOND, FIRST),
        ev("SessionFirstPartyAnswer", "2026-11-03 12:30:08", SECOND, FIRST),
        ("recording", {"EventName": "SessionRecordingFailed", "EventTimestamp": "2026-11-03 12:30:08",
                       "SessionUUID": S2, "VirtualNumber": VN2, "FirstParty": FIRST, "SecondParty": SECOND,
                       "RecordingUUID": REC_C}),
        ev("SessionFirstPartyComplete", "2026-11-03 12:30:38", SECOND, FIRST, **billing(30, 30, "0.00425", NORMAL)),
        ev("SessionSecondPartyComplete", "2026-11-03 12:30:38", SECOND, FIRST, **billing(38, 38, "0.00538", NORMAL)),
        ev("SessionVirtualNumberAnswer", "2026-11-04 00:10:00", FIRST, SECOND),
        ev("SessionSecondPartyInitiated", "2026-11-04 00:10:01", FIRST, SECOND),
        ev("SessionSecondPartyRing", "2026-11-04 00:10:02", FIRST, SECOND),
        ev("SessionSecondPartyFailed", "2026-11-04 00:10:32", FIRST, SECOND, **billing(0, 0, "0.00000", BUSY)),
        ev("SessionFirstPartyComplete", "2026-11-04 00:10:32", FIRST, SECOND, **billing(32, 60, "0.00850", NORMAL)),
        ("session", {"EventName": "SessionTimeout", "EventTimestamp": "2026-11-04 12:00:00", "SessionUUID": S2,
                     "VirtualNumber": VN2}),
    ]


def _s3_callbacks() -> list[tuple[str, dict]]:
    """Latest names, per-second billing, a session we never created. Two wrong PINs and a right one,
    then call E (09:00, 2026-11-05): first calls second, who answers; 150 s talk, recorded."""
    parties = {"SessionUUID": S3, "VirtualNumber": VN3, "FirstParty": FIRST3, "SecondParty": SECOND3}

    def ev(name: str, at: str, **extra: str) -> tuple[str, dict]:
        return "session", {"EventName": name, "EventTimestamp": at, **parties, "From": FIRST3, "To": SECOND3,
                           **extra}

    def rec(name: str, at: str, **extra: str) -> tuple[str, dict]:
        return "recording", {"EventName": name, "EventTimestamp": at, **parties, "RecordingUUID": REC_E,
                             "RecordingResourceURL": RESOURCE_E, "RecordingStartTime": "2026-11-05 09:00:08",
                             "RecordingFormat": ".wav", **extra}

    return [
        ev("SessionPinAuthenticationStatus", "2026-11-05 08:59:40", PinAuthenticationStatus="failed",
           PinRetryCounter="1"),
        ev("SessionPinAuthenticationStatus", "2026-11-05 08:59:48", PinAuthenticationStatus="failed",
           PinRetryCounter="2"),
        ev("SessionPinAuthenticationStatus", "2026-11-05 08:59:55", PinAuthenticationStatus="success",
           PinRetryCounter="3"),
        ev("SessionVirtualNumberAnswer", "2026-11-05 09:00:00"),
        ev("SessionSecondPartyInitiated", "2026-11-05 09:00:01"),
        ev("SessionSecondPartyRing", "2026-11-05 09:00:02"),
        ev("SessionSecondPartyAnswer", "2026-11-05 09:00:08"),
        rec("SessionRecordingInitiated", "2026-11-05 09:00:08"),
        ev("SessionSecondPartyComplete", "2026-11-05 09:02:38", **billing(150, 150, "0.02125", NORMAL)),
        ev("SessionFirstPartyComplete", "2026-11-05 09:02:38", **billing(158, 158, "0.02238", NORMAL)),
        rec("SessionRecordingCompleted", "2026-11-05 09:02:38", RecordingDuration="150",
            RecordingEndTime="2026-11-05 09:02:38"),
    ]


def build_dataset(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(insert(MaskingSession), [
            # S1 runs for four years: it must not be past its expiry when the tests run (it would be expired).
            _api_session(S1, "order-1", VN1, "2026-11-02 09:00:00", "2030-11-02 09:00:00", 126230400, "0.00500"),
            _api_session(S2, "order-1", VN2, "2026-11-03 12:00:00", "2026-11-04 12:00:00", 86400, "0.00000"),
            _api_session(S4, "order-2", VN4, "2026-11-02 15:00:00", "2026-11-02 16:00:00", 3600, "0.00000"),
            _api_session(S5, "order-3", VN5, "2026-11-06 10:00:00", "2026-11-06 11:00:00", 3600, "0.00000"),
        ])
    s4_timeout = ("session", {"EventName": "SessionTimeout", "EventTimestamp": "2026-11-02 16:00:00",
                              "SessionUUID": S4, "VirtualNumber": VN4})
    app = create_app({"TESTING": True, "settings": make_settings("http://127.0.0.1:9", PROJECT_IN_WEB="false"),
                      "database_url": engine.url.render_as_string(hide_password=False)})
    try:
        outcomes = [store_callback(app, endpoint, params)
                    for endpoint, params in [*_s1_callbacks(), *_s2_callbacks(), *_s3_callbacks(), s4_timeout]]
        settle(app)
    finally:
        app.extensions["webhook_service"].close()
    assert outcomes.count("duplicate") == 1 and set(outcomes) == {"recorded", "duplicate"}  # S1's redelivery
    with engine.begin() as conn:
        # A discovered session is created when it is first projected (now); pin that to
        # the first callback's time so the expected days below do not depend on when tests run.
        conn.execute(text("UPDATE masking_sessions SET created_at = '2026-11-05 08:59:40+00' WHERE session_uuid = :u"),
                     {"u": S3})
        # Reconciliation's results: Plivo counts one more billed minute leg for S1, and agrees on S2.
        conn.execute(text("""
            UPDATE masking_sessions AS s
               SET plivo_call_count = v.calls, plivo_billed_duration = v.billed, plivo_amount = v.amount,
                   reconciled_at = v.at
              FROM (VALUES (:s1, 5, 360, 0.05100, timestamptz '2026-11-04 01:00:00+00'),
                           (:s2, 4, 128, 0.01813, timestamptz '2026-11-04 13:00:00+00')) AS v(uuid, calls, billed,
                                                                                              amount, at)
             WHERE s.session_uuid = v.uuid
        """), {"s1": S1, "s2": S2})


@pytest.fixture
def dataset(engine: Engine) -> Engine:
    build_dataset(engine)
    return engine


def rows(conn: Connection, query: str, **params) -> list[tuple]:
    return [tuple(row) for row in conn.execute(text(query), params)]


# Expected rows -----------------------------------------------------------------------------------

VIEW_COLUMNS = {
    "session_summary": [
        "session_uuid", "external_ref", "origin", "first_party", "second_party", "virtual_number", "status",
        "created_at", "expires_at", "ended_at", "call_count", "answered_call_count", "billed_duration",
        "billed_minutes", "amount", "session_amount", "total_amount", "recording_count", "last_interaction_at",
        "plivo_call_count", "plivo_billed_duration", "plivo_amount", "call_count_drift", "billed_duration_drift",
        "amount_drift", "reconciled_at", "first_party_pin", "second_party_pin", "plivo_api_id",
    ],
    "call_activity_daily": [
        "day", "sessions_created", "sessions_with_calls", "call_legs", "answered_legs", "answer_rate",
        "billed_duration", "billed_minutes", "amount", "avg_billed_seconds_per_answered_leg", "recordings",
    ],
    "call_legs": [
        "session_uuid", "external_ref", "virtual_number", "party", "call_uuid", "from_number", "to_number",
        "initiated_at", "ringing_at", "answered_at", "ended_at", "answered", "end_event", "hangup_cause",
        "hangup_cause_code", "duration", "billed_duration", "billed_minutes", "amount", "source",
    ],
    "recordings": [
        "session_uuid", "external_ref", "recording_uuid", "status", "recording_url", "resource_url", "duration",
        "format", "started_at", "ended_at",
    ],
    "pin_authentications": ["session_uuid", "external_ref", "event_at", "status", "retry_counter", "from_number"],
    "virtual_number_history": ["session_uuid", "virtual_number", "assigned_at"],
}

# S1: legs 120+120+60+0 billed s, 0.01700+0.01700+0.00850 USD; Plivo has one more leg (60 s, 0.00850).
# S2: legs 30+38+60+0 s, 0.00425+0.00538+0.00850 USD. S3: 158+150 s (5.1333 min), 0.02238+0.02125 USD.
SUMMARY = {
    S1: {"session_uuid": S1, "external_ref": "order-1", "origin": "api", "first_party": FIRST,
         "second_party": SECOND, "virtual_number": VN9, "status": "active", "created_at": t("2026-11-02 09:00:00"),
         "expires_at": t("2030-11-02 09:00:00"), "ended_at": None, "call_count": 4, "answered_call_count": 3,
         "billed_duration": 300, "billed_minutes": D("5.00"), "amount": D("0.04250"), "session_amount": D("0.00500"),
         "total_amount": D("0.04750"), "recording_count": 1, "last_interaction_at": t("2026-11-04 00:00:16"),
         "plivo_call_count": 5, "plivo_billed_duration": 360, "plivo_amount": D("0.05100"), "call_count_drift": -1,
         "billed_duration_drift": -60, "amount_drift": D("-0.00850"), "reconciled_at": t("2026-11-04 01:00:00")},
    S2: {"session_uuid": S2, "external_ref": "order-1", "origin": "api", "first_party": FIRST,
         "second_party": SECOND, "virtual_number": VN2, "status": "expired", "created_at": t("2026-11-03 12:00:00"),
         "expires_at": t("2026-11-04 12:00:00"), "ended_at": t("2026-11-04 12:00:00"), "call_count": 4,
         "answered_call_count": 3, "billed_duration": 128, "billed_minutes": D("2.13"), "amount": D("0.01813"),
         "session_amount": D("0.00000"), "total_amount": D("0.01813"), "recording_count": 0,
         "last_interaction_at": t("2026-11-04 00:10:32"), "plivo_call_count": 4, "plivo_billed_duration": 128,
         "plivo_amount": D("0.01813"), "call_count_drift": 0, "billed_duration_drift": 0, "amount_drift": D("0"),
         "reconciled_at": t("2026-11-04 13:00:00")},
    S3: {"session_uuid": S3, "external_ref": None, "origin": "callback", "first_party": FIRST3,
         "second_party": SECOND3, "virtual_number": VN3, "status": "active", "created_at": t("2026-11-05 08:59:40"),
         "expires_at": None, "ended_at": None, "call_count": 2, "answered_call_count": 2, "billed_duration": 308,
         "billed_minutes": D("5.13"), "amount": D("0.04363"), "session_amount": None, "total_amount": D("0.04363"),
         "recording_count": 1, "last_interaction_at": t("2026-11-05 09:02:38"), "plivo_call_count": None,
         "plivo_billed_duration": None, "plivo_amount": None, "call_count_drift": None,
         "billed_duration_drift": None, "amount_drift": None, "reconciled_at": None},
    S4: {"session_uuid": S4, "external_ref": "order-2", "origin": "api", "first_party": FIRST,
         "second_party": SECOND, "virtual_number": VN4, "status": "expired", "created_at": t("2026-11-02 15:00:00"),
         "expires_at": t("2026-11-02 16:00:00"), "ended_at": t("2026-11-02 16:00:00"), "call_count": 0,
         "answered_call_count": 0, "billed_duration": 0, "billed_minutes": D("0.00"), "amount": D("0"),
         "session_amount": D("0"), "total_amount": D("0"), "recording_count": 0, "last_interaction_at": None,
         "plivo_call_count": None, "plivo_billed_duration": None, "plivo_amount": None, "call_count_drift": None,
         "billed_duration_drift": None, "amount_drift": None, "reconciled_at": None},
    S5: {"session_uuid": S5, "external_ref": "order-3", "origin": "api", "first_party": FIRST,
         "second_party": SECOND, "virtual_number": VN5, "status": "active", "created_at": t("2026-11-06 10:00:00"),
         "expires_at": t("2026-11-06 11:00:00"), "ended_at": None, "call_count": 0, "answered_call_count": 0,
         "billed_duration": 0, "billed_minutes": D("0.00"), "amount": D("0"), "session_amount": D("0"),
         "total_amount": D("0"), "recording_count": 0, "last_interaction_at": None, "plivo_call_count": None,
         "plivo_billed_duration": None, "plivo_amount": None, "call_count_drift": None,
         "billed_duration_drift": None, "amount_drift": None, "reconciled_at": None},
}
# The dataset's sessions have no PIN authentication and predate Plivo api_ids (revision 0009's columns).
for _row in SUMMARY.values():
    _row.update(first_party_pin=None, second_party_pin=None, plivo_api_id=None)

# Legs by the UTC day they started (call B starts 2026-11-03 23:59:30 and ends after midnight).
# 11-02: sessions S1, S4; call A: 2 answered legs, 240 s, 0.03400, a recording.
# 11-03: session S2; call B (60 s answered + 0 s), call C (30 + 38 s): 4 legs, 3 answered, 128 s,
#        ACD 128 / 3 = 42.67, 0.00850 + 0.00538 + 0.00425 = 0.01813; C's recording failed.
# 11-04: call D: 2 legs, 1 answered (60 s, 0.00850). 11-05: S3 and call E (158 + 150 s = 5.13 min,
# ACD 154, 0.04363, a recording). 11-06: session S5 only.
DAILY = [
    (date(2026, 11, 2), 2, 1, 2, 2, D("1.0000"), 240, D("4.00"), D("0.03400"), D("120.00"), 1),
    (date(2026, 11, 3), 1, 2, 4, 3, D("0.7500"), 128, D("2.13"), D("0.01813"), D("42.67"), 0),
    (date(2026, 11, 4), 0, 1, 2, 1, D("0.5000"), 60, D("1.00"), D("0.00850"), D("60.00"), 0),
    (date(2026, 11, 5), 1, 1, 2, 2, D("1.0000"), 308, D("5.13"), D("0.04363"), D("154.00"), 1),
    (date(2026, 11, 6), 1, 0, 0, 0, None, 0, D("0.00"), D("0"), None, 0),
]

# Every leg shows the session's current number (S1's was replaced before call B).
LEGS = [
    (S1, "order-1", VN9, "first", None, FIRST, SECOND, None, None, t("2026-11-02 10:00:00"),
     t("2026-11-02 10:01:37"), True, "hangup", "NORMAL_CLEARING", 4000, 97, 120, D("2.00"), D("0.01700"),
     "callback"),
    (S1, "order-1", VN9, "second", None, FIRST, SECOND, None, t("2026-11-02 10:00:01"), t("2026-11-02 10:00:07"),
     t("2026-11-02 10:01:37"), True, "hangup", "NORMAL_CLEARING", 4000, 90, 120, D("2.00"), D("0.01700"),
     "callback"),
    (S1, "order-1", VN9, "first", None, FIRST, SECOND, None, None, t("2026-11-03 23:59:30"),
     t("2026-11-04 00:00:16"), True, "hangup", "NORMAL_CLEARING", 4000, 46, 60, D("1.00"), D("0.00850"),
     "callback"),
    (S1, "order-1", VN9, "second", None, FIRST, SECOND, None, t("2026-11-03 23:59:31"), None,
     t("2026-11-04 00:00:16"), False, "hangup", "NO_ANSWER", 3000, 0, 0, D("0.00"), D("0.00000"), "callback"),
    (S2, "order-1", VN2, "second", None, SECOND, FIRST, None, None, t("2026-11-03 12:30:00"),
     t("2026-11-03 12:30:38"), True, "complete", "NORMAL_CLEARING", 4000, 38, 38, D("0.63"), D("0.00538"),
     "callback"),
    (S2, "order-1", VN2, "first", None, SECOND, FIRST, t("2026-11-03 12:30:01"), t("2026-11-03 12:30:02"),
     t("2026-11-03 12:30:08"), t("2026-11-03 12:30:38"), True, "complete", "NORMAL_CLEARING", 4000, 30, 30,
     D("0.50"), D("0.00425"), "callback"),
    (S2, "order-1", VN2, "first", None, FIRST, SECOND, None, None, t("2026-11-04 00:10:00"),
     t("2026-11-04 00:10:32"), True, "complete", "NORMAL_CLEARING", 4000, 32, 60, D("1.00"), D("0.00850"),
     "callback"),
    (S2, "order-1", VN2, "second", None, FIRST, SECOND, t("2026-11-04 00:10:01"), t("2026-11-04 00:10:02"), None,
     t("2026-11-04 00:10:32"), False, "failed", "USER_BUSY", 3010, 0, 0, D("0.00"), D("0.00000"), "callback"),
    (S3, None, VN3, "first", None, FIRST3, SECOND3, None, None, t("2026-11-05 09:00:00"), t("2026-11-05 09:02:38"),
     True, "complete", "NORMAL_CLEARING", 4000, 158, 158, D("2.63"), D("0.02238"), "callback"),
    (S3, None, VN3, "second", None, FIRST3, SECOND3, t("2026-11-05 09:00:01"), t("2026-11-05 09:00:02"),
     t("2026-11-05 09:00:08"), t("2026-11-05 09:02:38"), True, "complete", "NORMAL_CLEARING", 4000, 150, 150,
     D("2.50"), D("0.02125"), "callback"),
]


# Views -------------------------------------------------------------------------------------------


def test_views_have_the_documented_columns_in_order(engine):
    with engine.connect() as conn:
        found = {}
        for view, column in rows(conn, """
            SELECT table_name, column_name FROM information_schema.columns
             WHERE table_schema = 'reporting' ORDER BY table_name, ordinal_position
        """):
            found.setdefault(view, []).append(column)
    assert found == VIEW_COLUMNS


def test_session_summary(dataset):
    with dataset.connect() as conn:
        result = conn.execute(text("SELECT * FROM reporting.session_summary ORDER BY session_uuid")).mappings()
        assert [dict(row) for row in result] == [SUMMARY[s] for s in (S1, S2, S3, S4, S5)]


def test_call_activity_daily(dataset):
    with dataset.connect() as conn:
        assert rows(conn, "SELECT * FROM reporting.call_activity_daily ORDER BY day") == DAILY
        assert rows(conn, """
            SELECT day, call_legs FROM reporting.call_activity_daily
             WHERE day BETWEEN '2026-11-03' AND '2026-11-05' ORDER BY day
        """) == [(date(2026, 11, 3), 4), (date(2026, 11, 4), 2), (date(2026, 11, 5), 2)]


def test_call_activity_daily_rounds_to_the_documented_places(dataset):
    with dataset.connect() as conn:
        shown = rows(conn, """
            SELECT answer_rate::text, billed_minutes::text, avg_billed_seconds_per_answered_leg::text
              FROM reporting.call_activity_daily WHERE day = '2026-11-03'
        """)
    assert shown == [("0.7500", "2.13", "42.67")]


def test_call_activity_daily_has_no_day_for_totals_that_cancelled_out(dataset):
    """A shard row whose deltas sum to zero (a leg moved to another day) is not a day of activity."""
    with dataset.begin() as conn:
        conn.execute(text("INSERT INTO daily_call_totals (day, shard) VALUES ('2026-11-10', 3)"))
        assert rows(conn, "SELECT day FROM reporting.call_activity_daily WHERE day >= '2026-11-06'") == [
            (date(2026, 11, 6),)]


def test_call_legs(dataset):
    with dataset.connect() as conn:
        assert rows(conn, """
            SELECT * FROM reporting.call_legs
             ORDER BY session_uuid, least(initiated_at, ringing_at, answered_at, ended_at), party
        """) == LEGS


def test_recordings(dataset):
    with dataset.connect() as conn:
        assert rows(conn, "SELECT * FROM reporting.recordings ORDER BY session_uuid") == [
            (S1, "order-1", REC_A, "completed", MEDIA_A, RESOURCE_A, 90, ".mp3", t("2026-11-02 10:00:07"),
             t("2026-11-02 10:01:37")),
            (S2, "order-1", REC_C, "failed", None, None, None, None, None, None),
            (S3, None, REC_E, "completed", None, RESOURCE_E, 150, ".wav", t("2026-11-05 09:00:08"),
             t("2026-11-05 09:02:38")),
        ]


def test_pin_authentications(dataset):
    with dataset.connect() as conn:
        assert rows(conn, "SELECT * FROM reporting.pin_authentications ORDER BY event_at") == [
            (S3, None, t("2026-11-05 08:59:40"), "failed", 1, FIRST3),
            (S3, None, t("2026-11-05 08:59:48"), "failed", 2, FIRST3),
            (S3, None, t("2026-11-05 08:59:55"), "success", 3, FIRST3),
        ]


def test_virtual_number_history(dataset):
    with dataset.connect() as conn:
        assert rows(conn, "SELECT * FROM reporting.virtual_number_history ORDER BY assigned_at") == [
            (S1, VN1, t("2026-11-02 09:00:00")),
            (S1, VN9, t("2026-11-03 07:00:00")),
        ]


def _plan_nodes(plan: dict) -> Iterator[dict]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


def test_a_range_of_days_reads_index_ranges_and_no_call_legs(dataset):
    """The day filter must reach both sources as index conditions (a FULL JOIN would not let it)."""
    with dataset.begin() as conn:
        # Tiny tables are otherwise read whole: ask for plain index scans, to see their conditions.
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        conn.execute(text("SET LOCAL enable_bitmapscan = off"))
        [[plan]] = conn.execute(text("""
            EXPLAIN (FORMAT JSON) SELECT * FROM reporting.call_activity_daily
             WHERE day BETWEEN '2026-11-01' AND '2026-11-30'
        """)).one()
    scans = {node["Relation Name"]: node for node in _plan_nodes(plan["Plan"]) if "Relation Name" in node}
    assert set(scans) == {"masking_sessions", "daily_call_totals"}
    assert scans["masking_sessions"]["Index Name"] == "ix_masking_sessions_created_day"
    for node in scans.values():
        assert "'2026-11-01'::date" in node["Index Cond"] and "'2026-11-30'::date" in node["Index Cond"]


# The reader role ----------------------------------------------------------------------------------


@contextmanager
def as_reader(engine: Engine) -> Iterator[Connection]:
    """A connection acting as reporting_reader until the transaction ends (always rolled back)."""
    with engine.connect() as conn:
        conn.begin()
        conn.execute(text(f"SET LOCAL ROLE {READER}"))
        try:
            yield conn
        finally:
            conn.rollback()


def assert_denied(engine: Engine, statement: str) -> None:
    with as_reader(engine) as conn, pytest.raises(ProgrammingError) as denied:
        conn.execute(text(statement))
    assert isinstance(denied.value.orig, psycopg.errors.InsufficientPrivilege), denied.value


def test_reader_role_cannot_log_in(engine):
    with engine.connect() as conn:
        assert rows(conn, "SELECT rolcanlogin, rolsuper FROM pg_roles WHERE rolname = :r", r=READER) == [
            (False, False)]


@pytest.mark.parametrize("view", list(VIEW_COLUMNS))
def test_reader_can_select_every_view(dataset, view):
    with as_reader(dataset) as conn:
        assert conn.execute(text(f"SELECT count(*) FROM reporting.{view}")).scalar_one() > 0


@pytest.mark.parametrize("view", list(VIEW_COLUMNS))
def test_reader_holds_only_select_on_every_view(engine, view):
    with engine.connect() as conn:
        granted = {privilege for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES",
                                               "TRIGGER")
                   if conn.execute(text("SELECT has_table_privilege(:r, :v, :p)"),
                                   {"r": READER, "v": f"reporting.{view}", "p": privilege}).scalar_one()}
    assert granted == {"SELECT"}


@pytest.mark.parametrize("statement", [
    # session_summary reads one table, so Postgres could write through it: only privileges stop that.
    "INSERT INTO reporting.session_summary (session_uuid) VALUES ('x')",
    "UPDATE reporting.session_summary SET external_ref = 'x'",
    "DELETE FROM reporting.session_summary",
    "INSERT INTO public.masking_sessions (session_uuid) VALUES ('x')",
    "UPDATE public.call_legs SET amount = 0",
    "DELETE FROM public.recordings",
    "SELECT * FROM public.callback_inbox",
    "SELECT * FROM public.call_legs",
    "SELECT * FROM public.daily_call_totals",
    "CREATE VIEW reporting.mine AS SELECT 1 AS one",
])
def test_reader_is_denied(dataset, statement):
    assert_denied(dataset, statement)


def test_reader_can_read_views_added_to_the_schema_later(engine):
    with engine.connect() as conn:
        conn.begin()
        conn.execute(text("CREATE VIEW reporting.later AS SELECT 1 AS one"))
        assert conn.execute(text("SELECT has_table_privilege(:r, 'reporting.later', 'SELECT')"),
                            {"r": READER}).scalar_one()
        conn.rollback()


# The migration -------------------------------------------------------------------------------------


def test_downgrade_keeps_the_role_but_leaves_nothing_referring_to_it(database_url, scratch_url):
    """The test database (`database_url`) grants the role too: it exists and is in use elsewhere."""
    config = alembic_config(scratch_url)
    command.upgrade(config, "head")
    command.downgrade(config, "0003")
    engine = create_engine(sqlalchemy_url(scratch_url))
    try:
        with engine.connect() as conn:
            assert rows(conn, "SELECT 1 FROM pg_roles WHERE rolname = :r", r=READER) == [(1,)]
            assert rows(conn, """
                SELECT classid::regclass::text FROM pg_shdepend
                 WHERE refobjid = (SELECT oid FROM pg_roles WHERE rolname = :r)
                   AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
            """, r=READER) == []
            assert rows(conn, "SELECT 1 FROM pg_namespace WHERE nspname = 'reporting'") == []
        command.upgrade(config, "head")
        with engine.connect() as conn:
            assert rows(conn, "SELECT has_schema_privilege(:r, 'reporting', 'USAGE')", r=READER) == [(True,)]
    finally:
        engine.dispose()


# docs/reporting.md -------------------------------------------------------------------------------


def doc_sql_blocks() -> list[str]:
    return re.findall(r"^```sql\n(.*?)^```", DOCS.read_text(), flags=re.S | re.M)


def doc_view_columns() -> dict[str, list[str]]:
    """The columns each view's table in the docs lists, in order."""
    documented: dict[str, list[str]] = {}
    view = None
    for line in DOCS.read_text().splitlines():
        if line.startswith("#"):
            match = re.fullmatch(r"### `reporting\.(\w+)`", line)
            view = match.group(1) if match else None
        elif view and line.startswith("| `"):
            documented.setdefault(view, []).extend(re.findall(r"`(\w+)`", line.split("|")[1]))
    return documented


def test_docs_describe_every_column_of_every_view():
    assert doc_view_columns() == VIEW_COLUMNS


def test_docs_sql_blocks_are_found():
    """Guards the parametrized test below, which would otherwise pass with no queries at all."""
    assert doc_sql_blocks()


@pytest.mark.parametrize("query", doc_sql_blocks(), ids=lambda q: " ".join(q.split())[:60])
def test_docs_queries_run_as_the_reader(dataset, query):
    assert "public." not in query
    with as_reader(dataset) as conn:
        conn.execute(text(query)).all()


def test_docs_drift_query_finds_the_drifting_session(dataset):
    [query] = [q for q in doc_sql_blocks() if "amount_drift <> 0" in q]
    since = "now() - interval '30 days'"
    assert since in query
    with as_reader(dataset) as conn:
        found = [row[0] for row in conn.execute(text(query.replace(since, "'2026-11-01'")))]
    assert found == [S1]


# flask report --------------------------------------------------------------------------------------


def invoke(app, *args: str):
    return app.test_cli_runner().invoke(args=["report", *args])


DAILY_TABLE = """\
day         sessions_created  sessions_with_calls  call_legs  answered_legs  answer_rate  billed_duration  \
billed_minutes   amount  avg_billed_seconds_per_answered_leg  recordings
----------  ----------------  -------------------  ---------  -------------  -----------  ---------------  \
--------------  -------  -----------------------------------  ----------
2026-11-03                 1                    2          4              3       0.7500              128  \
          2.13  0.01813                                42.67           0
2026-11-04                 0                    1          2              1       0.5000               60  \
          1.00  0.00850                                60.00           0
"""


def test_report_daily_table(app, dataset):
    result = invoke(app, "daily", "--since", "2026-11-03", "--until", "2026-11-04")
    assert result.exit_code == 0, result.output
    assert result.output == DAILY_TABLE


def test_report_daily_csv_until_the_latest_day(app, dataset):
    result = invoke(app, "daily", "--since", "2026-11-05", "--format", "csv")
    assert result.exit_code == 0, result.output
    assert list(csv.reader(io.StringIO(result.output))) == [
        VIEW_COLUMNS["call_activity_daily"],
        ["2026-11-05", "1", "1", "2", "2", "1.0000", "308", "5.13", "0.04363", "154.00", "1"],
        ["2026-11-06", "1", "0", "0", "0", "", "0", "0.00", "0.00000", "", "0"],
    ]


def test_report_daily_json(app, dataset):
    result = invoke(app, "daily", "--since", "2026-11-01", "--until", "2026-11-02", "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [{
        "day": "2026-11-02", "sessions_created": 2, "sessions_with_calls": 1, "call_legs": 2, "answered_legs": 2,
        "answer_rate": "1.0000", "billed_duration": 240, "billed_minutes": "4.00", "amount": "0.03400",
        "avg_billed_seconds_per_answered_leg": "120.00", "recordings": 1,
    }]


def test_report_daily_says_so_when_there_is_no_activity(app, dataset):
    result = invoke(app, "daily", "--since", "2030-01-01")
    assert (result.exit_code, result.output) == (0, "No sessions created and no calls from 2030-01-01 on.\n")
    result = invoke(app, "daily", "--since", "2020-01-01", "--until", "2020-01-31")
    assert result.output == "No sessions created and no calls from 2020-01-01 to 2020-01-31.\n"
    assert json.loads(invoke(app, "daily", "--since", "2030-01-01", "--format", "json").output) == []


def test_report_daily_refuses_an_until_before_since(app, engine):
    result = invoke(app, "daily", "--since", "2026-11-05", "--until", "2026-11-04")
    assert result.exit_code == 2
    assert "--until" in result.output


def test_report_session_table(app, dataset):
    result = invoke(app, "session", S2)
    assert result.exit_code == 0, result.output
    summary, legs = result.output.split("\n\n")
    assert summary.splitlines()[:3] == [
        f"session_uuid           {S2}",
        "external_ref           order-1",
        "origin                 api",
    ]
    assert "billed_minutes         2.13" in summary.splitlines()
    assert "ended_at               2026-11-04T12:00:00+00:00" in summary.splitlines()
    assert "plivo_call_count       4" in summary.splitlines()
    assert legs.splitlines()[0] == "call legs (4)"
    header, rule, *lines = legs.splitlines()[1:]
    assert header.split() == [c for c in VIEW_COLUMNS["call_legs"]
                              if c not in ("session_uuid", "external_ref", "virtual_number")]
    assert [(line.split()[0], line.split()[-8]) for line in lines] == [
        ("second", "complete"), ("first", "complete"), ("first", "complete"), ("second", "failed")]


def test_report_session_json(app, dataset):
    result = invoke(app, "session", S1, "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["session"] == {
        "session_uuid": S1, "external_ref": "order-1", "origin": "api", "first_party": FIRST,
        "second_party": SECOND, "virtual_number": VN9, "status": "active", "created_at": "2026-11-02T09:00:00+00:00",
        "expires_at": "2030-11-02T09:00:00+00:00", "ended_at": None, "call_count": 4, "answered_call_count": 3,
        "billed_duration": 300, "billed_minutes": "5.00", "amount": "0.04250", "session_amount": "0.00500",
        "total_amount": "0.04750", "recording_count": 1, "last_interaction_at": "2026-11-04T00:00:16+00:00",
        "plivo_call_count": 5, "plivo_billed_duration": 360, "plivo_amount": "0.05100", "call_count_drift": -1,
        "billed_duration_drift": -60, "amount_drift": "-0.00850", "reconciled_at": "2026-11-04T01:00:00+00:00",
        "first_party_pin": None, "second_party_pin": None, "plivo_api_id": None,
    }
    assert report["call_legs"][3] == {
        "session_uuid": S1, "external_ref": "order-1", "virtual_number": VN9, "party": "second", "call_uuid": None,
        "from_number": FIRST, "to_number": SECOND, "initiated_at": None, "ringing_at": "2026-11-03T23:59:31+00:00",
        "answered_at": None, "ended_at": "2026-11-04T00:00:16+00:00", "answered": False, "end_event": "hangup",
        "hangup_cause": "NO_ANSWER", "hangup_cause_code": 3000, "duration": 0, "billed_duration": 0,
        "billed_minutes": "0.00", "amount": "0.00000", "source": "callback",
    }
    assert [(leg["party"], leg["answered"], leg["billed_duration"]) for leg in report["call_legs"]] == [
        ("first", True, 120), ("second", True, 120), ("first", True, 60), ("second", False, 0)]


def test_report_session_without_legs(app, dataset):
    result = invoke(app, "session", S4, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["call_legs"] == []


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_report_session_unknown(app, engine, fmt):
    result = invoke(app, "session", "00000000-0000-4000-8000-000000000000", "--format", fmt)
    assert result.exit_code == 1
    assert "no session 00000000-0000-4000-8000-000000000000" in result.output
