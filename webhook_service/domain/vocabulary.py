"""The service's closed vocabularies: the values a status, a party or an event kind may take.

The models' CHECK constraints and the OpenAPI document are built from these, so each list has one home.
"""

SESSION_STATUSES = ("active", "in-progress", "expired")
SESSION_ORIGINS = ("api", "callback", "reconcile")
ATTEMPT_STATES = ("pending", "succeeded", "failed", "unknown", "recovered", "not_found")
INBOX_STATUSES = ("pending", "applied", "ignored", "failed")
INBOX_ENDPOINTS = ("session", "recording")
PARTIES = ("first", "second")
LEG_END_EVENTS = ("hangup", "complete", "failed")
RECORDING_STATUSES = ("initiated", "completed", "failed")
LEG_EVENT_KINDS = ("initiated", "ringing", "answered", "ended")
