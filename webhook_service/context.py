"""The app-wide context: what every use case needs, built once per process by `create_app`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import ApiError
from .persistence.db import Database
from .persistence.group_commit import GroupCommit
from .plivo.client import PlivoClient
from .settings import Settings

if TYPE_CHECKING:
    from .services.projector import BackgroundProjector, Projector


@dataclass
class Context:
    """What the use cases need: the database, the Plivo client, the settings and the projector."""

    db: Database
    plivo: PlivoClient
    settings: Settings
    projector: Projector
    # The web process's projector thread (None outside web processes, or with PROJECT_IN_WEB off).
    background: BackgroundProjector | None = None
    # The webhook path's statements, committed together with those of concurrent callbacks.
    group_commit: GroupCommit = field(init=False)
    # Bounds the API requests of this process that wait on Plivo (PLIVO_MAX_CONCURRENCY).
    plivo_slots: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(2))

    def __post_init__(self) -> None:
        self.group_commit = GroupCommit(self.db)

    def close(self) -> None:
        """Stop the projector thread and close the database pools (tests, and process exit)."""
        if self.background is not None:
            self.background.stop()
        self.db.dispose()

    @contextmanager
    def plivo_slot(self) -> Iterator[None]:
        """Hold one of the Plivo slots, or answer 503 at once if all are taken."""
        if not self.plivo_slots.acquire(blocking=False):
            raise ApiError("Too many requests are waiting on Plivo; retry shortly", status=503, code="plivo_busy",
                           headers={"Retry-After": "1"})
        try:
            yield
        finally:
            self.plivo_slots.release()
