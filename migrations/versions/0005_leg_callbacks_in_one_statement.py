"""leg callbacks applied in one statement

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 05:20:00.000000

Most callbacks report a fact about a party's leg (initiated, ringing, answered, ended). For those,
`webhooks/inbox.py` makes one call, `SELECT apply_leg_callback(...)`: one round trip and one
transaction that stores the callback in the inbox (deduplicated), locks the session, records the
leg fact, re-derives the session's legs (the statement `DERIVE_LEGS`), adds the change of its
activity to the daily totals and updates its counters. It is the cycle of `webhooks/state.py`,
done by Postgres; a hypothesis test (tests/test_legs.py) holds its legs equal to
`webhooks/legs.build_legs`' and its counters and daily totals equal to what the Python path
computes from them.

What the function leaves to the Python path:
* sessions with Plivo interaction records (reconciliation's facts, which need `build_legs`'
  matching of calls to legs): it takes back the inbox row it inserted and answers 'deferred'
  (having changed nothing), and the caller applies the callback through `state.py` instead;
* a redelivery of a callback stored but not applied (its apply failed, or was cut short): it
  answers 'deferred' having written nothing, and `state.py` applies the stored row again.

The UTC day a leg counts on is `leg_day`, used by the view `session_daily_activity` (a session's
activity per day, which `reporting.daily_totals.RECOUNT` sums for a full recount) and by
`DERIVE_LEGS` (the change of one session's activity). The Python twin, for `state.py`, is
`reporting.daily_totals.session_activity_of`; tests hold the three equal.
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

SHARDS = 16  # webhook_service.reporting.daily_totals.SHARDS
FACTS = ("call_uuid", "end_event", "duration", "billed_duration", "amount", "hangup_cause", "hangup_cause_code",
         "from_number", "to_number")
LEG_COLUMNS = ("party", "initiated_at", "ringing_at", "answered_at", "ended_at", *FACTS, "source")

# The UTC day a leg counts on: the day it started (its earliest known time).
LEG_DAY = """
CREATE FUNCTION leg_day(initiated_at timestamptz, ringing_at timestamptz, answered_at timestamptz,
                        ended_at timestamptz, created_at timestamptz) RETURNS date
    LANGUAGE sql IMMUTABLE PARALLEL SAFE  -- a one-expression SQL function: the planner inlines it
    AS $$
        SELECT (timezone('UTC', coalesce(LEAST(initiated_at, ringing_at, answered_at, ended_at), created_at)))::date
    $$
"""

SESSION_DAILY_ACTIVITY = """
CREATE VIEW session_daily_activity AS
SELECT session_id, day, sum(legs)::bigint AS legs, sum(answered)::bigint AS answered, sum(billed)::bigint AS billed,
       sum(answered_billed)::bigint AS answered_billed, sum(amount) AS amount, sum(recordings)::bigint AS recordings
  FROM (SELECT session_id, leg_day(initiated_at, ringing_at, answered_at, ended_at, created_at) AS day,
               1 AS legs, (answered_at IS NOT NULL)::int AS answered, coalesce(billed_duration, 0) AS billed,
               CASE WHEN answered_at IS NOT NULL THEN coalesce(billed_duration, 0) ELSE 0 END AS answered_billed,
               coalesce(amount, 0) AS amount, 0 AS recordings
          FROM call_legs
        UNION ALL
        SELECT session_id, (timezone('UTC', coalesce(started_at, ended_at, created_at)))::date, 0, 0, 0, 0, 0, 1
          FROM recordings WHERE status <> 'failed') AS activity
 GROUP BY session_id, day
"""

# One statement that re-derives session `sid`'s legs from its leg events alone (no interaction
# records), as legs.build_legs derives them, and writes what changed:
#
# * each end is a leg; an earlier event belongs to its party's leg with the earliest end at or
#   after it, or to the party's open leg; a fact is the first known value: the end's, then by
#   time (and kind, for ties);
# * the legs are paired with the stored rows as state._leg_changes pairs them (same party and end;
#   then the party's others in order): rows that differ are updated, missing ones inserted, the
#   rest deleted;
# * the change of the session's activity per day (the derived legs' minus the stored legs'; a leg
#   callback changes no recording) is added to daily_call_totals, as session_daily_activity counts;
# * it returns the session's counters from the derived legs.
#
# Every CTE reads the snapshot from before the statement's own writes, so `stored` is the before.
DERIVE_LEGS = """
    WITH facts AS (
        SELECT e.*, CASE WHEN e.kind = 'ended' THEN e.at
                         ELSE (SELECT min(x.at) FROM leg_events x
                                WHERE x.session_id = sid AND x.party = e.party AND x.kind = 'ended' AND x.at >= e.at)
                    END AS leg_end
          FROM leg_events e WHERE e.session_id = sid
    ), wanted AS (
        SELECT party, leg_end AS ended_at,
               min(at) FILTER (WHERE kind = 'initiated') AS initiated_at,
               min(at) FILTER (WHERE kind = 'ringing') AS ringing_at,
               min(at) FILTER (WHERE kind = 'answered') AS answered_at,
               {first_known},
               row_number() OVER (PARTITION BY party ORDER BY leg_end NULLS LAST) AS n
          FROM facts GROUP BY party, leg_end
    ), stored AS (
        SELECT * FROM call_legs WHERE session_id = sid
    ), same_end AS (
        SELECT w.party, w.n, st.id FROM wanted w
          JOIN stored st ON st.party = w.party AND st.ended_at IS NOT DISTINCT FROM w.ended_at
    ), spare_wanted AS (
        SELECT party, n, row_number() OVER (PARTITION BY party ORDER BY n) AS k FROM wanted w
         WHERE NOT EXISTS (SELECT FROM same_end m WHERE m.party = w.party AND m.n = w.n)
    ), spare_rows AS (
        SELECT party, id, row_number() OVER (PARTITION BY party ORDER BY id) AS k FROM stored
         WHERE id NOT IN (SELECT id FROM same_end)
    ), paired AS (
        SELECT w.*, coalesce(m.id, r.id) AS leg_id FROM wanted w
          LEFT JOIN same_end m ON m.party = w.party AND m.n = w.n
          LEFT JOIN spare_wanted sw ON sw.party = w.party AND sw.n = w.n
          LEFT JOIN spare_rows r ON r.party = sw.party AND r.k = sw.k
    ), updated AS (
        UPDATE call_legs c SET {assign}, source = 'callback', updated_at = now()
          FROM paired p
         WHERE c.id = p.leg_id AND ({c_columns}) IS DISTINCT FROM ({p_columns}, 'callback')
    ), inserted AS (
        INSERT INTO call_legs (session_id, {leg_columns})
        SELECT sid, {paired_columns}, 'callback' FROM paired WHERE leg_id IS NULL
    ), deleted AS (
        DELETE FROM call_legs
         WHERE session_id = sid AND id NOT IN (SELECT leg_id FROM paired WHERE leg_id IS NOT NULL)
    ), per_day AS (
        SELECT day, sum(legs) AS legs, sum(answered) AS answered, sum(billed) AS billed,
               sum(answered_billed) AS answered_billed, sum(amount) AS amount,
               (count(*) FILTER (WHERE side > 0) > 0)::int - (count(*) FILTER (WHERE side < 0) > 0)::int
                   AS sessions_with_calls
          FROM (SELECT side, leg_day(initiated_at, ringing_at, answered_at, ended_at, created_at) AS day,
                       side AS legs, side * (answered_at IS NOT NULL)::int AS answered,
                       side * coalesce(billed_duration, 0) AS billed,
                       side * CASE WHEN answered_at IS NOT NULL THEN coalesce(billed_duration, 0) ELSE 0 END
                           AS answered_billed,
                       side * coalesce(amount, 0) AS amount
                  FROM (SELECT 1 AS side, initiated_at, ringing_at, answered_at, ended_at, now() AS created_at,
                               billed_duration, amount FROM wanted
                        UNION ALL
                        SELECT -1, initiated_at, ringing_at, answered_at, ended_at, created_at,
                               billed_duration, amount FROM stored) AS legs
               ) AS change
         GROUP BY day
    ), totals AS (
        INSERT INTO daily_call_totals AS t (day, shard, call_legs, answered_legs, billed_duration,
                                            answered_billed_duration, amount, sessions_with_calls)
        SELECT day, sid % {shards}, legs, answered, billed, answered_billed, amount, sessions_with_calls
          FROM per_day
         WHERE legs <> 0 OR answered <> 0 OR billed <> 0 OR answered_billed <> 0 OR amount <> 0
               OR sessions_with_calls <> 0
         ORDER BY day  -- one lock order for every transaction: no deadlocks between days of a shard
        ON CONFLICT (day, shard) DO UPDATE SET
            call_legs = t.call_legs + excluded.call_legs,
            answered_legs = t.answered_legs + excluded.answered_legs,
            billed_duration = t.billed_duration + excluded.billed_duration,
            answered_billed_duration = t.answered_billed_duration + excluded.answered_billed_duration,
            amount = t.amount + excluded.amount,
            sessions_with_calls = t.sessions_with_calls + excluded.sessions_with_calls
    )
    SELECT count(*), count(answered_at), coalesce(sum(billed_duration), 0), coalesce(sum(amount), 0)
      INTO n_legs, n_answered, n_billed, n_amount
      FROM wanted
""".format(
    first_known=",\n               ".join(
        f"(array_agg({f} ORDER BY kind = 'ended' DESC, at, kind COLLATE \"C\") FILTER (WHERE {f} IS NOT NULL))[1]"
        f" AS {f}" for f in FACTS),
    assign=", ".join(f"{c} = p.{c}" for c in LEG_COLUMNS if c not in ("party", "source")),
    c_columns=", ".join(f"c.{c}" for c in LEG_COLUMNS),
    p_columns=", ".join(f"p.{c}" for c in LEG_COLUMNS if c != "source"),
    leg_columns=", ".join(LEG_COLUMNS),
    paired_columns=", ".join(c for c in LEG_COLUMNS if c != "source"),
    shards=SHARDS,
)

# One callback about a leg, stored and applied in one transaction (see the module's docstring).
# Returns 'applied', 'duplicate' or 'deferred' (nothing changed: apply it through the Python path).
APPLY_LEG_CALLBACK = """
CREATE FUNCTION apply_leg_callback(
    p_endpoint text, p_method text, p_content_type text, p_params jsonb, p_nonce text, p_dedupe_key text,
    p_event_name text, p_inbox_session_uuid text,
    p_session_uuid text, p_at timestamptz, p_party text, p_kind text, p_caller text,
    p_first_party text, p_second_party text, p_virtual_number text,
    p_call_uuid text, p_end_event text, p_duration integer, p_billed_duration integer, p_amount numeric,
    p_hangup_cause text, p_hangup_cause_code integer, p_from_number text, p_to_number text
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    inbox_id bigint;
    stored_status text;
    stored_at timestamptz;
    s record;
    sid bigint;
    leg_party text := p_party;
    n_legs bigint;  -- the session's counters, when a leg fact was recorded
    n_answered bigint;
    n_billed bigint;
    n_amount numeric;
BEGIN
    INSERT INTO callback_inbox (endpoint, method, content_type, params, nonce, dedupe_key, event_name, session_uuid,
                                status, attempts, applied_at)
    VALUES (p_endpoint, p_method, p_content_type, p_params, p_nonce, p_dedupe_key, p_event_name,
            p_inbox_session_uuid, 'applied', 1, now())
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING id INTO inbox_id;
    IF NOT FOUND THEN
        SELECT status, received_at INTO stored_status, stored_at FROM callback_inbox WHERE dedupe_key = p_dedupe_key;
        IF stored_status = 'failed' OR (stored_status = 'pending' AND stored_at < now() - interval '5 seconds') THEN
            RETURN 'deferred';  -- stored, never applied: the Python path applies it again
        END IF;
        RETURN 'duplicate';
    END IF;

    SELECT id, first_party, second_party INTO s FROM masking_sessions WHERE session_uuid = p_session_uuid FOR UPDATE;
    IF NOT FOUND THEN  -- a session this service never heard of: record what the callback says
        INSERT INTO masking_sessions (session_uuid, origin, status, first_party, second_party, virtual_number)
        VALUES (p_session_uuid, 'callback', 'active', p_first_party, p_second_party, p_virtual_number)
        ON CONFLICT (session_uuid) DO NOTHING;
        SELECT id, first_party, second_party INTO STRICT s
          FROM masking_sessions WHERE session_uuid = p_session_uuid FOR UPDATE;
    END IF;
    sid := s.id;
    -- Reconciliation's facts need build_legs' matching of calls to legs. This must be a statement
    -- of its own, after the lock: its snapshot then holds everything committed before the lock
    -- was granted (a subquery of the locking statement would read the snapshot from before it
    -- waited, and miss the interactions of a reconciliation it waited for).
    IF EXISTS (SELECT FROM plivo_interactions WHERE session_id = sid) THEN
        DELETE FROM callback_inbox WHERE id = inbox_id;  -- the Python path stores it with its effects
        RETURN 'deferred';
    END IF;

    IF leg_party IS NULL THEN  -- the caller, named only by number (SessionVirtualNumberAnswer)
        leg_party := CASE WHEN p_caller IN (p_first_party, s.first_party) THEN 'first'
                          WHEN p_caller IN (p_second_party, s.second_party) THEN 'second' END;
    END IF;
    IF leg_party IS NOT NULL THEN
        INSERT INTO leg_events (session_id, party, kind, at, {fact_columns})
        VALUES (sid, leg_party, p_kind, p_at, {fact_params})
        ON CONFLICT (session_id, party, kind, at) DO UPDATE SET {fill};
        {derive_legs};
    END IF;
    UPDATE masking_sessions  -- counters from the derived legs (kept when no leg fact was recorded)
       SET call_count = coalesce(n_legs, call_count), answered_call_count = coalesce(n_answered, answered_call_count),
           billed_duration = coalesce(n_billed, billed_duration), amount = coalesce(n_amount, amount),
           last_interaction_at = greatest(last_interaction_at, p_at),
           first_party = coalesce(first_party, p_first_party), second_party = coalesce(second_party, p_second_party),
           updated_at = now()
     WHERE id = sid;
    RETURN 'applied';
END
$$
""".format(
    fact_columns=", ".join(FACTS),
    fact_params=", ".join(f"p_{f}" for f in FACTS),
    fill=", ".join(f"{f} = coalesce(leg_events.{f}, excluded.{f})" for f in FACTS),
    derive_legs=DERIVE_LEGS.strip(),
)


def upgrade() -> None:
    op.execute(LEG_DAY)
    op.execute(SESSION_DAILY_ACTIVITY)
    op.execute("COMMENT ON VIEW session_daily_activity IS 'One session''s activity per UTC day (internal)'")
    op.execute(APPLY_LEG_CALLBACK)


def downgrade() -> None:
    op.execute("DROP FUNCTION apply_leg_callback")
    op.execute("DROP VIEW session_daily_activity")
    op.execute("DROP FUNCTION leg_day")
