"""Who called the internal API: an identifier of the bearer token, to store where the token may not be."""

from __future__ import annotations

import hashlib
import hmac

# A fixed, public label: the identifier must be stable (the same token, the same id, in every process
# and after every restart) and must not give the token back. It is not a secret.
_LABEL = b"webhook-service/api-token-id/v1"


def token_id(token: str) -> str:
    """HMAC-SHA256 of the token under a fixed label, in hex (64 characters). Tokens are random strings
    (API_TOKENS), so the id cannot be turned back into one; a short, guessable token could be found
    by trying candidates against it, as against any unsalted hash."""
    return hmac.new(_LABEL, token.encode(), hashlib.sha256).hexdigest()
