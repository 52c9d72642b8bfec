"""The service's closed vocabularies: the values a status, a party or an event kind may take.

The models' CHECK constraints and the OpenAPI document are built from these, so each list has one home.
"""

SESSION_STATUSES = ("active", "in-progress", "expired")
SESSION_ORIGINS = ("api", "callback", "reconcile")
ATTEMPT_STATES = ("pending", "succeeded", "failed", "unknown", "recovered", "not_found")
# Attempts whose outcome is not settled yet (`flask sessions resolve` works on these; retention keeps them).
UNRESOLVED_ATTEMPT_STATES = ("pending", "unknown")
INBOX_STATUSES = ("recorded", "ignored", "failed")
INBOX_ENDPOINTS = ("session", "recording")
PARTIES = ("first", "second")
LEG_END_EVENTS = ("hangup", "complete", "failed")
RECORDING_STATUSES = ("initiated", "completed", "failed")
LEG_PHASES = ("initiated", "ringing", "answered", "ended")
# What a callback reports: a leg's phase, a recording's news, the session's timeout, a new virtual
# number, a PIN check, or the end of a call (SessionPartiesHangup).
FACT_KINDS = ("leg", "recording", "timeout", "number", "pin", "call_done")
