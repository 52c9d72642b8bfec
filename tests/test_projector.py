"""The projector against real Postgres: due sessions, races with callbacks, locks, failures, lag.

Each race is made deterministic by holding a lock from the test (a session's row lock, or an
advisory lock that a trigger waits on), checking what waits and what does not, then releasing it.
"""

from __future__ import annotations

import threading

import requests
from sqlalchemy import text

from webhook_service import create_app
from webhook_service.services.projector import run_worker

from .helpers import (
    LiveServer,
    free_port,
    make_settings,
    queued,
    rows_locked,
    settle,
    wait_for_lock,
    wait_until,
    writes_held,
    writes_refused,
)
from .test_webhooks import AUTH, create_session, play, send, snapshot


def counters(engine, uuid: str) -> tuple:
    with engine.connect() as conn:
        return tuple(conn.execute(text("SELECT call_count, billed_duration FROM masking_sessions"
                                       " WHERE session_uuid = :u"), {"u": uuid}).one())


def failed_projections(live) -> float:
    """projections_total{outcome="failed"} as /metrics reports it now (0 before the first failure)."""
    metrics = requests.get(live.url + "/metrics", timeout=5).text
    lines = [line for line in metrics.splitlines() if line.startswith('projections_total{outcome="failed"} ')]
    return float(lines[0].split()[1]) if lines else 0.0


def quiet_live(database_url, sandbox) -> LiveServer:
    """The app on a real port with no background projector (as every test app): nothing is projected unless asked."""
    port = free_port()
    settings = make_settings(sandbox.url, f"http://127.0.0.1:{port}")
    return LiveServer(create_app({"TESTING": True, "settings": settings, "database_url": database_url}), port).start()


def test_callbacks_of_one_session_never_wait_for_its_lock(live, sandbox, engine):
    """The request path appends; it neither reads nor locks the session, so a projection (or anything
    else) holding the session's row cannot hold up Plivo's callbacks."""
    uuid = create_session(live)
    result = play(sandbox, uuid, deliver=False)
    callbacks = result["callbacks"]
    with rows_locked(engine, f"SELECT 1 FROM masking_sessions WHERE session_uuid = '{uuid}' FOR UPDATE"):
        # Answered while the test still holds the lock (a callback that waited for it would be
        # answered 503 once the 5 s statement timeout cancelled its wait).
        answers = [send(callback).json()["status"] for callback in callbacks]
    assert answers == ["recorded"] * len(callbacks)
    settle(live.app)
    assert counters(engine, uuid) == (2, result["session"]["total_call_billed_duration"])
    assert queued(engine) == 0


def test_a_fact_committed_during_a_projection_is_projected_afterwards(database_url, sandbox, engine):
    """The projection deletes the queue rows it read, not the session's: a fact that arrives while
    it runs keeps its session due, and the next projection includes it."""
    live = quiet_live(database_url, sandbox)
    projector = live.app.extensions["webhook_service"].projector
    try:
        uuid = create_session(live)
        callbacks = play(sandbox, uuid, deliver=False, duration=70)["callbacks"]
        late = [c for c in callbacks if c["params"]["EventName"] == "SessionFirstPartyHangup"]
        for callback in callbacks:
            if callback not in late:
                assert send(callback).json() == {"status": "recorded"}
        outcome = {}
        with writes_held(engine, "call_legs", 4243) as release:
            projection = threading.Thread(target=lambda: outcome.update(first=projector.project([uuid])))
            projection.start()
            wait_for_lock(engine, "%INSERT INTO call_legs%")  # it has read the queue and the facts
            assert send(late[0]).json() == {"status": "recorded"}  # committed while it runs
            release()
            projection.join(10)
        assert [p.session_uuid for p in outcome["first"].projected] == [uuid]
        assert queued(engine) == 1 and projector.is_due(uuid)  # the late fact's row survived
        first_billed = counters(engine, uuid)[1]
        assert [p.session_uuid for p in projector.project([uuid]).projected] == [uuid]
        assert queued(engine) == 0 and counters(engine, uuid)[1] > first_billed
    finally:
        live.stop()


def test_a_background_projector_skips_a_session_another_holds_and_a_read_waits_for_it(database_url, sandbox,
                                                                                      engine):
    live = quiet_live(database_url, sandbox)
    projector = live.app.extensions["webhook_service"].projector
    try:
        uuid = create_session(live)
        for callback in play(sandbox, uuid, deliver=False)["callbacks"]:
            send(callback)
        with rows_locked(engine, f"SELECT 1 FROM masking_sessions WHERE session_uuid = '{uuid}' FOR UPDATE"):
            skipped = projector.project([uuid])
            assert skipped.busy == {uuid} and skipped.projected == [] and counters(engine, uuid) == (0, 0)
            reader = threading.Thread(target=lambda: requests.get(f"{live.url}/v1/sessions/{uuid}", headers=AUTH,
                                                                  timeout=10))
            reader.start()
            wait_for_lock(engine, "%FOR UPDATE%")  # the read-your-writes projection waits for the lock
        reader.join(10)
        assert counters(engine, uuid)[0] == 2 and queued(engine) == 0
    finally:
        live.stop()


def test_reads_are_read_your_writes_without_any_background_projection(database_url, sandbox, engine):
    live = quiet_live(database_url, sandbox)
    try:
        uuid = create_session(live, record=True)
        result = play(sandbox, uuid, duration=75)
        assert counters(engine, uuid) == (0, 0)  # stored, not projected
        body = requests.get(f"{live.url}/v1/sessions/{uuid}", headers=AUTH, timeout=10).json()
        assert (body["call_count"], body["billed_duration"], body["recording_count"]) == (
            result["session"]["total_call_count"], result["session"]["total_call_billed_duration"], 1)
        assert body["projection_pending"] is False and queued(engine) == 0
    finally:
        live.stop()


def test_the_web_process_projects_its_callbacks_by_itself(database_url, sandbox, engine):
    """With only `web` running, the background thread brings the record up to date within a moment."""
    port = free_port()
    settings = make_settings(sandbox.url, f"http://127.0.0.1:{port}", PROJECT_IN_WEB="true")
    live = LiveServer(create_app({"TESTING": True, "settings": settings, "database_url": database_url}), port).start()
    try:
        uuid = create_session(live, record=True)
        result = play(sandbox, uuid, duration=75)
        assert wait_until(lambda: queued(engine) == 0)
        assert counters(engine, uuid) == (2, result["session"]["total_call_billed_duration"])
    finally:
        live.stop()


def test_one_session_that_cannot_be_projected_does_not_hold_up_the_others(database_url, sandbox, engine):
    live = quiet_live(database_url, sandbox)
    projector = live.app.extensions["webhook_service"].projector
    try:
        good, bad = create_session(live), create_session(live, second_party="+14155552671")
        for uuid in (good, bad):
            for callback in play(sandbox, uuid, deliver=False)["callbacks"]:
                send(callback)
        failed_before = failed_projections(live)
        refused = f"NEW.session_id = (SELECT id FROM masking_sessions WHERE session_uuid = '{bad}')"
        with writes_refused(engine, "call_legs", "'this session''s legs are refused'", when=refused):
            outcome = projector.project_due()
        assert [p.session_uuid for p in outcome.projected] == [good] and outcome.failed == {bad}
        assert counters(engine, good)[0] == 2 and counters(engine, bad) == (0, 0) and projector.is_due(bad)
        ready = requests.get(live.url + "/readyz", timeout=5).json()
        assert ready["status"] == "ok" and ready["projection_lag_seconds"] > 0
        assert failed_projections(live) == failed_before + 1
        projector._failed_until.clear()
        settle(live.app)
        assert counters(engine, bad)[0] == 2
    finally:
        live.stop()


def test_projecting_again_with_nothing_new_writes_nothing(live, sandbox, engine):
    uuid = create_session(live, record=True)
    for callback in play(sandbox, uuid, deliver=False)["callbacks"]:
        send(callback)
    before = snapshot(live, engine, uuid)
    with engine.connect() as conn:
        updated = conn.execute(text("SELECT max(updated_at) FROM call_legs")).scalar()
        conn.execute(text("INSERT INTO projection_queue (session_uuid) VALUES (:u)"), {"u": uuid})
        conn.commit()
    assert snapshot(live, engine, uuid) == before
    with engine.connect() as conn:
        assert conn.execute(text("SELECT max(updated_at) FROM call_legs")).scalar() == updated


def test_two_projections_of_one_session_never_interleave(database_url, sandbox, engine):
    """Deterministic: the first projection is held (a trigger waits on a lock the test owns) after it
    has read the session; a second projector of the same session must then wait on the session's row
    lock, not read the same state and add the same change again."""
    from webhook_service.services.projector import Projector

    from .test_webhooks import assert_daily_totals_match_a_recount

    live = quiet_live(database_url, sandbox)
    first = live.app.extensions["webhook_service"].projector
    second = Projector(live.app.extensions["webhook_service"].db)
    try:
        uuid = create_session(live)
        result = play(sandbox, uuid, deliver=False, duration=70)
        for callback in result["callbacks"]:
            send(callback)
        outcomes: dict[str, object] = {}
        waiting_on = text("SELECT wait_event FROM pg_stat_activity WHERE datname = current_database()"
                          " AND wait_event_type = 'Lock'")
        with writes_held(engine, "call_legs", 4251) as release:
            a = threading.Thread(target=lambda: outcomes.update(a=first.project([uuid], wait=True)))
            a.start()
            wait_for_lock(engine, "%INSERT INTO call_legs%")  # A has read the session and writes
            b = threading.Thread(target=lambda: outcomes.update(b=second.project([uuid], wait=True)))
            b.start()
            wait_for_lock(engine, "%FOR UPDATE%")  # B waits on the row lock A holds...
            with engine.connect() as conn:  # ...and nowhere else: it has read nothing yet
                waits = sorted(r[0] for r in conn.execute(waiting_on))
            assert waits in (["advisory", "transactionid"], ["advisory", "tuple"]), waits
            release()
            a.join(10)
            b.join(10)
        assert [p.session_uuid for p in outcomes["a"].projected] == [uuid]
        assert outcomes["b"].projected == []  # nothing was due once A had committed
        plivo = result["session"]
        assert counters(engine, uuid) == (plivo["total_call_count"], plivo["total_call_billed_duration"])
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM call_legs")).scalar() == 2
        assert_daily_totals_match_a_recount(engine)
    finally:
        live.stop()


def test_the_worker_loop_projects_what_is_left_due_until_it_is_stopped(database_url, sandbox, engine):
    """`flask worker`'s loop (`run_worker`): facts stored while nothing projects (no web projector:
    PROJECT_IN_WEB is off in the test apps) are projected by it, call after call, until it is stopped."""
    live = quiet_live(database_url, sandbox)
    projector = live.app.extensions["webhook_service"].projector
    stop = threading.Event()
    worker = threading.Thread(target=run_worker, args=(projector, stop), kwargs={"poll": 0.01}, daemon=True)
    try:
        uuid = create_session(live)
        first = play(sandbox, uuid, duration=70)["session"]  # delivered: stored, and nothing projects them
        assert queued(engine) > 0 and counters(engine, uuid) == (0, 0)
        worker.start()
        assert wait_until(lambda: queued(engine) == 0, alive=worker.is_alive), "the worker projected nothing"
        assert counters(engine, uuid) == (2, first["total_call_billed_duration"])
        # It keeps going: a later call's facts are projected as well.
        second = play(sandbox, uuid, duration=130, caller="second")["session"]
        assert wait_until(lambda: queued(engine) == 0, alive=worker.is_alive)
        assert counters(engine, uuid) == (4, second["total_call_billed_duration"])
        assert worker.is_alive()
    finally:
        stop.set()
        worker.join(10)
        live.stop()
    assert not worker.is_alive()  # the stop event ends it


def test_a_kept_session_projects_as_if_it_were_read_whole(database_url, sandbox, engine):
    """A busy session's projector keeps its facts and projection and reads only what is new: call
    after call, with a callback arriving late (an earlier time), a replay, and another projector
    (another process) projecting it in between, the stored rows are what a projector reading the
    session whole makes of them, and the daily totals match a recount."""
    from webhook_service.services import inbox
    from webhook_service.services.projector import Projector

    from .test_webhooks import assert_daily_totals_match_a_recount

    live = quiet_live(database_url, sandbox)
    ctx = live.app.extensions["webhook_service"]
    mine = ctx.projector = Projector(ctx.db, keep_from=1)
    other = Projector(ctx.db)
    try:
        uuid = create_session(live, record=True, session_expiry=7200)
        late = None
        kept = []
        for call in range(6):
            callbacks = play(sandbox, uuid, deliver=False, duration=30 + 20 * call)["callbacks"]
            if call == 1:
                late, callbacks = callbacks[1], callbacks[:1] + callbacks[2:]
            for n, callback in enumerate(callbacks):
                assert send(callback).status_code == 200
                if call == 4 and n == 2:
                    other.project_all_due()  # another process projects it: the kept copy is stale
            if call == 3:
                assert send(late).status_code == 200
            if call == 2:  # a replay projects (from the kept copy), so nothing is left due below
                with engine.connect() as conn:
                    replayed = conn.execute(text("SELECT max(id) FROM callback_inbox")).scalar()
                assert inbox.replay(ctx, ids=[replayed]) == {"recorded": 1}
            outcome = mine.project([uuid])
            kept.append(outcome.projected[0].legs_kept if outcome.projected else "nothing due")
            requests.post(f"{sandbox.url}/sandbox/clock", json={"advance": 300}, timeout=5)  # the next call, later
        # Legs kept from the last projection (by party: how many), None when derived whole.
        assert kept == [None, {"first": 1, "second": 1}, "nothing due", {"first": 1, "second": 1}, None,
                        {"first": 5, "second": 5}], kept
        incremental = snapshot(live, engine, uuid)
        with engine.connect() as conn:
            conn.execute(text("INSERT INTO projection_queue (session_uuid) VALUES (:u)"), {"u": uuid})
            conn.commit()
        assert [p.legs_kept for p in Projector(ctx.db).project([uuid]).projected] == [None]
        assert snapshot(live, engine, uuid) == incremental
        assert incremental["session"]["call_count"] == 12
        assert_daily_totals_match_a_recount(engine)
    finally:
        live.stop()
