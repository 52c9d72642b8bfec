"""A local fake of Plivo's Masking Session API, with signed callbacks and fault injection, for tests and dev."""

from webhook_service.sandbox.app import create_sandbox_app
from webhook_service.sandbox.server import SandboxServer
from webhook_service.sandbox.state import SandboxState

__all__ = ["SandboxServer", "SandboxState", "create_sandbox_app"]
