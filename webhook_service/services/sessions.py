"""Session use cases: create (idempotent, never lost), read, list, update, expire, resolve.

Services own their transactions; no transaction is held open while Plivo is called.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, cast, delete, func, literal, literal_column, or_, select, update
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.orm import Session

from ..context import Context
from ..domain.plivo_parameters import PARAMETERS
from ..domain.requests import CreateRequest, ListQuery, encode_cursor, validate_update
from ..domain.vocabulary import SESSION_STATUSES, UNRESOLVED_ATTEMPT_STATES
from ..errors import ApiError, Conflict, NotFound
from ..logs import mask_phone
from ..persistence.models import (
    CallLeg,
    MaskingSession,
    ProjectionQueue,
    Recording,
    SessionCreateAttempt,
    VirtualNumberAssignment,
)
from ..plivo.client import (
    PlivoAuthError,
    PlivoBadResponse,
    PlivoError,
    PlivoForbidden,
    PlivoNotFound,
    PlivoRateLimited,
    PlivoRejected,
    PlivoServerError,
    PlivoSession,
    PlivoTimeout,
    PlivoUnavailable,
    plivo_time,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    status: int
    body: dict[str, Any]
    replayed: bool = False


def serialize_session(row: MaskingSession) -> dict[str, Any]:
    """The API's view of a stored session."""

    return {
        "session_uuid": row.session_uuid,
        "external_ref": row.external_ref,
        "metadata": row.meta,
        "first_party": row.first_party,
        "second_party": row.second_party,
        "virtual_number": row.virtual_number,
        "status": row.status,
        "origin": row.origin,
        "record": row.record,
        "session_expiry": row.session_expiry,
        "parameters": {k: v for k, v in row.create_params.items() if "callback" not in k},
        "call_count": row.call_count,
        "answered_call_count": row.answered_call_count,
        "billed_duration": row.billed_duration,
        "amount": str(row.amount),
        "session_amount": str(row.session_amount) if row.session_amount is not None else None,
        "recording_count": row.recording_count,
        "last_interaction_at": _ts(row.last_interaction_at),
        "expires_at": _ts(row.expires_at),
        "expired_at": _ts(row.expired_at),
        "plivo_created_at": _ts(row.plivo_created_at),
        # The parties' PINs (the caller's, or Plivo's with generate_pin): the caller gives them to the parties.
        "first_party_pin": row.first_party_pin,
        "second_party_pin": row.second_party_pin,
        "plivo_api_id": row.plivo_api_id,
        "subaccount": row.subaccount,
        "created_at": _ts(row.created_at),
        "updated_at": _ts(row.updated_at),
    }


def plivo_error_to_api(exc: PlivoError) -> ApiError:
    """Translate a Plivo failure into what our caller sees (the message is passed on)."""
    details: dict[str, Any] = {"plivo_status": exc.status} if exc.status else {}
    if exc.api_id:  # what an operator quotes to Plivo's support
        details["plivo_api_id"] = exc.api_id
    if isinstance(exc, PlivoNotFound):
        return ApiError(f"Plivo: {exc.message}", status=404, code="not_found", details=details)
    if isinstance(exc, PlivoAuthError):
        return ApiError("Plivo refused our credentials", status=502, code="plivo_auth_failed", details=details)
    if isinstance(exc, PlivoForbidden):
        # Plivo's SDKs read a 403 on create as a geo-permission refusal; its text says what to change.
        return ApiError(f"Plivo refused the request: {exc.message}", status=422, code="plivo_forbidden",
                        details=details | {"plivo_message": exc.message})
    if isinstance(exc, PlivoRateLimited):
        return ApiError(f"Plivo rate limit: {exc.message}", status=503, code="plivo_rate_limited",
                        details=details, headers={"Retry-After": "5"})
    if isinstance(exc, PlivoRejected):
        return ApiError(f"Plivo: {exc.message}", status=422, code="plivo_rejected", details=details)
    if isinstance(exc, PlivoTimeout):
        return ApiError(exc.message, status=504, code="plivo_timeout", details=details)
    if isinstance(exc, PlivoUnavailable):
        return ApiError(exc.message, status=502, code="plivo_unavailable", details=details)
    return ApiError(f"Plivo error: {exc.message}", status=502, code="plivo_error", details=details)


# Create ---------------------------------------------------------------------------------------


def _request_hash(req: CreateRequest) -> str:
    return hashlib.sha256(json.dumps(req.canonical, sort_keys=True, default=str).encode()).hexdigest()


def create_session(ctx: Context, req: CreateRequest, idempotency_key: str | None, *, token_id: str) -> Result:
    """Create a Plivo session for `req`, at most once per idempotency key of the caller.

    `token_id` identifies the bearer token that called (`domain.callers.token_id`): a key is the
    caller's own, as Stripe scopes keys per account, so one caller's key never replays another's
    response, and two callers that pick the same key (an order id) each get their own session.
    """
    settings = ctx.settings
    plivo_params = dict(req.plivo_params) | {
        "callback_url": settings.session_callback_url,
        "callback_method": settings.callback_method,
        "recording_callback_url": settings.recording_callback_url,
        "recording_callback_method": settings.callback_method,
    }
    request_hash = _request_hash(req)
    with ctx.db.transaction() as s:
        attempt_id = s.execute(
            insert(SessionCreateAttempt)
            .values(
                token_id=token_id,
                idempotency_key=idempotency_key,
                request_hash=request_hash,
                request_body=req.canonical,
                plivo_params=plivo_params,
                first_party=req.plivo_params.get("first_party"),
                second_party=req.plivo_params.get("second_party"),
            )
            .on_conflict_do_nothing(index_elements=["token_id", "idempotency_key"])
            .returning(SessionCreateAttempt.id)
        ).scalar()
    if attempt_id is None:
        # The caller used the key before (or is using it right now in a concurrent request).
        return _replay(ctx, token_id, idempotency_key, request_hash)  # type: ignore[arg-type]

    try:
        created = ctx.plivo.create_session(plivo_params)
    except (PlivoTimeout, PlivoServerError, PlivoBadResponse) as exc:
        # Plivo may have created the session (a 2xx whose body cannot be read certainly did something):
        # record that we do not know, and find out later (`flask sessions resolve`) instead of
        # retrying and paying for a duplicate.
        api_error = plivo_error_to_api(exc)
        body = {
            "error": api_error.code,
            "message": f"{exc.message}; the session may have been created. It is recorded as create "
            f"attempt {attempt_id} and will be resolved against Plivo's records.",
            "details": api_error.details | {"attempt_id": attempt_id, "outcome": "unknown"},
        }
        _finish_attempt(ctx, attempt_id, "unknown", api_error.status, body, error=exc.message, api_id=exc.api_id)
        log.warning("create outcome unknown attempt=%s: %s", attempt_id, exc.message)
        return Result(api_error.status, body)
    except PlivoError as exc:
        api_error = _create_error(exc)
        body = {"error": api_error.code, "message": api_error.message, "details": api_error.details}
        # Plivo certainly did nothing when unreachable, rate-limited or refusing our credentials:
        # free the idempotency key so the caller's retry with the same key really retries.
        keep_key = not isinstance(exc, PlivoUnavailable | PlivoRateLimited | PlivoAuthError | PlivoForbidden)
        _finish_attempt(ctx, attempt_id, "failed", api_error.status, body, error=exc.message, keep_key=keep_key,
                        api_id=exc.api_id)
        return Result(api_error.status, body)

    created = _with_generated_pins(ctx, plivo_params, created)
    row = _store_created(ctx, attempt_id, req, plivo_params, created, state="succeeded")
    log.info("session created session_uuid=%s first_party=%s second_party=%s", created.session_uuid,
             mask_phone(created.first_party), mask_phone(created.second_party))
    return Result(201, serialize_session(row))


def _with_generated_pins(ctx: Context, plivo_params: dict[str, Any], created: PlivoSession) -> PlivoSession:
    """The session with Plivo's generated PINs: fetched once if the create answer lacks them.

    Reference §6.2: the session object carries `first_party_pin` and `second_party_pin`; whether the
    create answer's copy has them is not documented, so both readings are accepted. If the fetch fails
    the session is stored without them (a later `POST /v1/sessions/<uuid>/refresh` gets them).
    """
    if not plivo_params.get("generate_pin") or all(created.pins):
        return created
    try:
        fetched = ctx.plivo.get_session(created.session_uuid)
    except PlivoError as exc:
        log.warning("generated PINs of session %s not fetched: %s", created.session_uuid, type(exc).__name__)
        return created
    return replace(created, raw=created.raw | {k: v for k, v in fetched.raw.items() if k.endswith("_party_pin")})


def _create_error(exc: PlivoError) -> ApiError:
    error = plivo_error_to_api(exc)
    # Plivo's "Invalid parameter…"/"Mandatory parameter…" 400s are about the caller's input.
    if isinstance(exc, PlivoRejected) and exc.status == 400 and "parameter" in exc.message.lower():
        error.status, error.code = 400, "invalid_request"
    return error


def _finish_attempt(ctx: Context, attempt_id: int, state: str, status: int, body: dict[str, Any],
                    *, error: str | None = None, keep_key: bool = True, session_uuid: str | None = None,
                    api_id: str | None = None, s: Session | None = None) -> None:
    values: dict[str, Any] = {
        "state": state, "response_status": status, "response_body": body, "error": error,
        "finished_at": datetime.now(UTC), "session_uuid": session_uuid, "plivo_api_id": api_id,
    }
    if not keep_key:
        values["idempotency_key"] = None
    stmt = update(SessionCreateAttempt).where(SessionCreateAttempt.id == attempt_id).values(**values)
    if s is not None:
        s.execute(stmt)
        return
    with ctx.db.transaction() as tx:
        tx.execute(stmt)


def _session_values(created: PlivoSession) -> dict[str, Any]:
    first_pin, second_pin = created.pins
    return {
        "first_party_pin": first_pin,
        "second_party_pin": second_pin,
        "plivo_api_id": created.api_id,
        "first_party": created.first_party,
        "second_party": created.second_party,
        "status": created.status if created.status in SESSION_STATUSES else "active",
        "plivo_created_at": created.created_time,
        "plivo_modified_at": created.modified_time,
        "expires_at": created.expiry_time,
        "session_amount": created.amount,
    }


def _store_created(ctx: Context, attempt_id: int, req: CreateRequest, plivo_params: dict[str, Any],
                   created: PlivoSession, *, state: str) -> MaskingSession:
    values = _session_values(created) | {
        # The caller's own PINs when Plivo's answer does not repeat them.
        "first_party_pin": created.pins[0] or plivo_params.get("first_party_pin"),
        "second_party_pin": created.pins[1] or plivo_params.get("second_party_pin"),
        "original_virtual_number": created.virtual_number,
        "virtual_number": created.virtual_number,
        "session_uuid": created.session_uuid,
        "external_ref": req.external_ref,
        "meta": req.metadata,
        "origin": "api",
        "create_params": plivo_params,
        "record": bool(plivo_params.get("record", PARAMETERS["record"].default)),
        "session_expiry": plivo_params.get("session_expiry", PARAMETERS["session_expiry"].default),
        "subaccount": plivo_params.get("subaccount") or created.subaccount,
    }
    with ctx.db.transaction() as s:
        stmt = insert(MaskingSession).values(**values)
        # A callback may have arrived first and created the row ("discovered"): adopt it, keeping
        # its counters and a status that may already have moved on; its projection is redone with
        # what the API knows (its parties, its original number).
        stmt = stmt.on_conflict_do_update(
            index_elements=["session_uuid"],
            set_={
                "original_virtual_number": stmt.excluded.original_virtual_number,
                "external_ref": stmt.excluded.external_ref,
                "metadata": stmt.excluded.metadata,
                "origin": "api",
                "create_params": stmt.excluded.create_params,
                "record": stmt.excluded.record,
                "session_expiry": stmt.excluded.session_expiry,
                "first_party": stmt.excluded.first_party,
                "second_party": stmt.excluded.second_party,
                "plivo_created_at": stmt.excluded.plivo_created_at,
                "expires_at": stmt.excluded.expires_at,
                "session_amount": stmt.excluded.session_amount,
                "first_party_pin": stmt.excluded.first_party_pin,
                "second_party_pin": stmt.excluded.second_party_pin,
                "plivo_api_id": stmt.excluded.plivo_api_id,
                "subaccount": stmt.excluded.subaccount,
                "updated_at": datetime.now(UTC),
            },
        ).returning(MaskingSession, literal_column("xmax = 0").label("inserted"))
        row, inserted = s.execute(stmt).one()
        if not inserted:
            s.execute(insert(ProjectionQueue).values(session_uuid=row.session_uuid))
        _finish_attempt(ctx, attempt_id, state, 201, serialize_session(row), session_uuid=row.session_uuid,
                        api_id=created.api_id, s=s)
    if not inserted:
        ctx.projector.project([row.session_uuid], wait=True)
        row = get_session(ctx, row.session_uuid)
    return row


def _replay(ctx: Context, token_id: str, key: str, request_hash: str) -> Result:
    """Answer a caller's repeated idempotency key: the first response, or 409 if the body differs."""
    deadline = time.monotonic() + sum(ctx.plivo.timeout) + 2
    delay = 0.02
    while True:
        with ctx.db.transaction() as s:
            attempt = s.scalars(
                select(SessionCreateAttempt).where(SessionCreateAttempt.token_id == token_id,
                                                   SessionCreateAttempt.idempotency_key == key)
            ).one_or_none()
        if attempt is None:
            # The first request freed its key (Plivo was unreachable) between our insert and
            # this read; the caller may simply retry.
            raise Conflict("A request with this Idempotency-Key just failed; retry", code="idempotency_retry")
        if attempt.request_hash != request_hash:
            raise Conflict(
                "This Idempotency-Key was used with a different request body",
                code="idempotency_key_reused",
                details={"attempt_id": attempt.id},
            )
        if attempt.state == "unknown":
            resolved = resolve_attempt(ctx, attempt.id, grace=timedelta(0))
            if resolved is not None:
                attempt = resolved
        if attempt.state != "pending" and attempt.response_status is not None:
            return Result(attempt.response_status, attempt.response_body or {}, replayed=True)
        if time.monotonic() > deadline:
            raise Conflict("A request with this Idempotency-Key is still in progress; retry later",
                           code="idempotency_in_progress", details={"attempt_id": attempt.id})
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


# Resolve creates whose outcome is unknown -----------------------------------------------------


def resolve_attempt(ctx: Context, attempt_id: int, *, grace: timedelta = timedelta(minutes=2)
                    ) -> SessionCreateAttempt | None:
    """Look for an unknown-outcome create on Plivo; adopt the session if it exists.

    Plivo's list API filters on both parties and the created time; the earliest matching session
    that no other attempt has claimed is ours. If none exists and the attempt is older than
    `grace`, it is marked `not_found`: Plivo did not create it, and nothing is owed.
    """
    with ctx.db.transaction() as s:
        attempt = s.get(SessionCreateAttempt, attempt_id)
    if attempt is None or attempt.state not in ("unknown", "pending"):
        return attempt
    window_start = attempt.started_at - timedelta(minutes=1)
    window_end = (attempt.finished_at or datetime.now(UTC)) + timedelta(minutes=1)
    window: dict[str, Any] = {"created_time__gte": plivo_time(window_start),
                              "created_time__lte": plivo_time(window_end), "limit": 20}
    parties = {name: getattr(attempt, name) for name in ("first_party", "second_party") if getattr(attempt, name)}
    # Whether Plivo's list shows a subaccount's sessions to a search without `subaccount` is not
    # documented (reference §5 lists the filter, nothing more): a session created on a subaccount is
    # searched with it, which finds it under either reading.
    if attempt.plivo_params.get("subaccount"):
        window["subaccount"] = attempt.plivo_params["subaccount"]
    # Plivo stores parties as digits without '+' (reference §6.2) and its list filters are exact
    # matches (§5); whether a '+E.164' filter finds them too is not documented. So search in the
    # stored form first and, only if that finds nothing, in the '+' form; either way the parties
    # are compared normalised on the results. Declaring `not_created` after a miss would leave a
    # paid session untracked, or make the caller create a second one.
    sessions: list[PlivoSession] = []
    for form in (lambda n: n.lstrip("+"), lambda n: n):
        page = ctx.plivo.list_sessions(window | {name: form(number) for name, number in parties.items()})
        sessions = [p for p in page.sessions if all(getattr(p, name) == number for name, number in parties.items())]
        if sessions or not parties:
            break
    with ctx.db.transaction() as s:
        claimed = set(s.scalars(
            select(SessionCreateAttempt.session_uuid).where(
                SessionCreateAttempt.session_uuid.in_([p.session_uuid for p in sessions]),
                SessionCreateAttempt.id != attempt.id,
            )
        ))
    candidates = sorted((p for p in sessions if p.session_uuid not in claimed),
                        key=lambda p: (p.created_time or window_start, p.session_uuid))
    req = CreateRequest(plivo_params=attempt.request_body.get("plivo", {}),
                        external_ref=attempt.request_body.get("external_ref"),
                        metadata=attempt.request_body.get("metadata") or {})
    if candidates:
        _store_created(ctx, attempt.id, req, attempt.plivo_params, candidates[0], state="recovered")
        log.info("create attempt %s recovered as session %s", attempt.id, candidates[0].session_uuid)
    elif datetime.now(UTC) - attempt.started_at >= grace:
        body = {"error": "not_created", "message": "Plivo has no session for this request; it was not created",
                "details": {"attempt_id": attempt.id, "outcome": "not_created"}}
        _finish_attempt(ctx, attempt.id, "not_found", 502, body, error="no matching session on Plivo")
    with ctx.db.transaction() as s:
        return s.get(SessionCreateAttempt, attempt.id)


def resolve_pending_attempts(ctx: Context, *, grace: timedelta = timedelta(minutes=2)) -> dict[str, int]:
    """Resolve every unknown attempt, and every pending one that has clearly been abandoned."""
    stale = datetime.now(UTC) - timedelta(seconds=sum(ctx.plivo.timeout) + 30)
    with ctx.db.transaction() as s:
        ids = list(s.scalars(
            select(SessionCreateAttempt.id).where(
                or_(SessionCreateAttempt.state == "unknown",
                    and_(SessionCreateAttempt.state == "pending", SessionCreateAttempt.started_at < stale))
            ).order_by(SessionCreateAttempt.id)
        ))
    counts: dict[str, int] = {}
    for attempt_id in ids:
        try:
            attempt = resolve_attempt(ctx, attempt_id, grace=grace)
        except PlivoError as exc:
            log.warning("could not resolve attempt %s: %s", attempt_id, exc.message)
            counts["error"] = counts.get("error", 0) + 1
            continue
        state = attempt.state if attempt else "missing"
        counts[state] = counts.get(state, 0) + 1
    return counts


# Retention -----------------------------------------------------------------------------------


def prune_attempts(ctx: Context, *, older_than: timedelta, batch_size: int = 1000, pause: float = 0.0,
                   progress: Callable[[int, int], None] | None = None) -> int:
    """Delete finished create attempts started before `older_than` ago, in small batches; return how many.

    Pending and unknown attempts are kept, whatever their age, until `resolve` settles them. The
    sessions created stay (`masking_sessions`); what goes is each create's request, answer and
    idempotency key, which is then free again (as Stripe forgets keys after a day). Each batch is its
    own short transaction, walks the table in id order from where the last one stopped, and skips
    rows another transaction holds (a replay answering from one), so nothing waits on it.
    """
    cutoff = datetime.now(UTC) - older_than
    finished = and_(SessionCreateAttempt.started_at < cutoff,
                    SessionCreateAttempt.state.not_in(UNRESOLVED_ATTEMPT_STATES))
    deleted = after = total = 0
    if progress is not None:
        with ctx.db.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(SessionCreateAttempt).where(finished)).scalar_one()
    while True:
        oldest = (select(SessionCreateAttempt.id)
                  .where(SessionCreateAttempt.id > after, finished)
                  .order_by(SessionCreateAttempt.id).limit(batch_size).with_for_update(skip_locked=True))
        with ctx.db.engine.begin() as conn:
            ids = conn.execute(delete(SessionCreateAttempt)
                               .where(SessionCreateAttempt.id.in_(oldest.scalar_subquery()))
                               .returning(SessionCreateAttempt.id)).scalars().all()
        deleted += len(ids)
        if progress is not None:
            progress(deleted, max(total, deleted))
        if len(ids) < batch_size:
            return deleted
        after = max(ids)
        if pause:
            time.sleep(pause)


# Read, list ----------------------------------------------------------------------------------


def get_session(ctx: Context, session_uuid: str) -> MaskingSession:
    with ctx.db.transaction() as s:
        row = s.scalars(select(MaskingSession).where(MaskingSession.session_uuid == session_uuid)).one_or_none()
    if row is None:
        raise NotFound(f"No session {session_uuid}")
    return row


def list_sessions(ctx: Context, q: ListQuery) -> dict[str, Any]:
    stmt = select(MaskingSession)
    for name in ("status", "external_ref", "first_party", "second_party", "virtual_number"):
        value = getattr(q, name)
        if value is not None:
            stmt = stmt.where(getattr(MaskingSession, name) == value)
    if q.created_after:
        stmt = stmt.where(MaskingSession.created_at >= q.created_after)
    if q.created_before:
        stmt = stmt.where(MaskingSession.created_at < q.created_before)
    if q.subaccount is not None:
        stmt = stmt.where(MaskingSession.subaccount == q.subaccount)
    if q.expires_after:
        stmt = stmt.where(MaskingSession.expires_at >= q.expires_after)
    if q.expires_before:
        stmt = stmt.where(MaskingSession.expires_at < q.expires_before)
    if q.duration_min is not None or q.duration_max is not None:
        # Plivo's `duration`: seconds from its creation of the session to its expiry (reference §4), as
        # Plivo last told them; a session without both times is in no duration range.
        duration = func.extract("epoch", MaskingSession.expires_at - MaskingSession.plivo_created_at)
        if q.duration_min is not None:
            stmt = stmt.where(duration >= q.duration_min)
        if q.duration_max is not None:
            stmt = stmt.where(duration <= q.duration_max)
    if q.cursor:
        created_at, row_id = q.cursor
        stmt = stmt.where(
            or_(MaskingSession.created_at < created_at,
                and_(MaskingSession.created_at == created_at, MaskingSession.id < row_id))
        )
    stmt = stmt.order_by(MaskingSession.created_at.desc(), MaskingSession.id.desc()).limit(q.limit + 1)
    with ctx.db.transaction() as s:
        rows = list(s.scalars(stmt))
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    return {
        "sessions": [serialize_session(r) for r in rows],
        "next_cursor": encode_cursor(rows[-1].created_at, rows[-1].id) if more else None,
    }


# Update, expire ------------------------------------------------------------------------------


def update_session(ctx: Context, session_uuid: str, body: Any) -> dict[str, Any]:
    """Change what Plivo allows on a live session (the body is validated against the session's own
    kind: only a single-party session may get its parties), then store Plivo's answer."""
    row = get_session(ctx, session_uuid)
    params = validate_update(body, single_party=bool(row.create_params.get("create_session_with_single_party")),
                             region=ctx.settings.default_phone_region)
    if row.status == "expired":
        raise Conflict("The session has expired and can no longer be changed", code="session_expired")
    try:
        updated = ctx.plivo.update_session(session_uuid, params)
    except PlivoError as exc:
        raise _create_error(exc) from exc
    now = datetime.now(UTC)
    values = _session_values(updated) | {"updated_at": now}
    values = {k: v for k, v in values.items() if v is not None}
    values.pop("session_amount", None)
    # The status is projected: an answer saying the session expired is Plivo's report, an input.
    values.pop("status", None)
    if expired := updated.expired_by(now):
        values["plivo_expired_at"] = expired
    for name in ("record", "session_expiry"):
        if name in params:
            values[name] = params[name]
    with ctx.db.transaction() as s:
        s.execute(
            update(MaskingSession)
            .where(MaskingSession.session_uuid == session_uuid)
            .values(create_params=MaskingSession.create_params.op("||")(_jsonb(params)), **values)
        )
        s.execute(insert(ProjectionQueue).values(session_uuid=session_uuid))  # parties, expiry: project again
    ctx.projector.project([session_uuid], wait=True)
    return serialize_session(get_session(ctx, session_uuid))


def _jsonb(value: dict[str, Any]):
    return cast(literal(json.dumps(value)), JSONB)


def expire_session(ctx: Context, session_uuid: str) -> dict[str, Any]:
    """Expire on Plivo, record that the API did (`api_expired_at`), and project the session, which
    expires it (kept, with the time). Idempotent: an expired session is answered as it is."""
    row = get_session(ctx, session_uuid)
    if row.status == "expired":
        return serialize_session(row)
    try:
        ctx.plivo.expire_session(session_uuid)
    except PlivoNotFound:
        raise NotFound(f"Plivo has no session {session_uuid}") from None
    except PlivoRejected as exc:
        # "Session already expired": Plivo agrees with what we are about to record.
        if "expired" not in exc.message.lower():
            raise plivo_error_to_api(exc) from exc
    now = datetime.now(UTC)
    with ctx.db.transaction() as s:
        s.execute(update(MaskingSession).where(MaskingSession.session_uuid == session_uuid)
                  .values(api_expired_at=now, updated_at=now))
        s.execute(insert(ProjectionQueue).values(session_uuid=session_uuid))
    ctx.projector.project([session_uuid], wait=True, now=now)
    return serialize_session(get_session(ctx, session_uuid))



def session_details(ctx: Context, session_uuid: str) -> dict[str, Any]:
    """A stored session with its counters, call legs, recordings and virtual-number history.

    Read-your-writes: a session with facts not yet projected is projected first (waiting for a
    projector that holds it), so the answer includes every callback acknowledged before the request.
    If that projection fails (see the log), the last one is answered with `projection_pending`.
    """
    pending = False
    if ctx.projector.is_due(session_uuid):
        pending = bool(ctx.projector.project([session_uuid], wait=True).failed)
    with ctx.db.transaction() as s:
        row = s.scalars(select(MaskingSession).where(MaskingSession.session_uuid == session_uuid)).one_or_none()
        if row is None:
            raise NotFound(f"No session {session_uuid}")
        legs = s.scalars(select(CallLeg).where(CallLeg.session_id == row.id)
                         .order_by(CallLeg.ended_at.asc().nulls_last(), CallLeg.id)).all()
        recordings = s.scalars(select(Recording).where(Recording.session_id == row.id)
                               .order_by(Recording.started_at.asc().nulls_last(), Recording.id)).all()
        numbers = s.scalars(select(VirtualNumberAssignment).where(VirtualNumberAssignment.session_id == row.id)
                            .order_by(VirtualNumberAssignment.assigned_at)).all()
    return serialize_session(row) | {
        "projection_pending": pending,
        "call_legs": [_leg(leg) for leg in legs],
        "recordings": [_recording(r) for r in recordings],
        "virtual_number_history": [{"virtual_number": n.virtual_number, "assigned_at": _ts(n.assigned_at)}
                                   for n in numbers],
    }


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _leg(leg: CallLeg) -> dict[str, Any]:
    return {
        "party": leg.party, "call_uuid": leg.call_uuid,
        "initiated_at": _ts(leg.initiated_at), "ringing_at": _ts(leg.ringing_at),
        "answered_at": _ts(leg.answered_at), "ended_at": _ts(leg.ended_at), "end_event": leg.end_event,
        "duration": leg.duration, "billed_duration": leg.billed_duration,
        "amount": str(leg.amount) if leg.amount is not None else None,
        "hangup_cause": leg.hangup_cause, "hangup_cause_code": leg.hangup_cause_code,
        "from_number": leg.from_number, "to_number": leg.to_number, "source": leg.source,
    }


def _recording(rec: Recording) -> dict[str, Any]:
    return {
        "recording_uuid": rec.recording_uuid, "status": rec.status, "recording_url": rec.recording_url,
        "resource_url": rec.resource_url, "duration": rec.duration, "format": rec.format,
        "started_at": _ts(rec.started_at), "ended_at": _ts(rec.ended_at),
    }
