"""Fault drills: the real service under gunicorn, a private PostgreSQL and the sandbox Plivo, with faults injected."""
