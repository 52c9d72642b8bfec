"""A local fake of Plivo's Masking Session API, with signed callbacks and fault injection, for tests and dev."""

from plivo_sandbox.app import create_sandbox_app
from plivo_sandbox.server import SandboxServer
from plivo_sandbox.state import SandboxState

__all__ = ["SandboxServer", "SandboxState", "create_sandbox_app"]
