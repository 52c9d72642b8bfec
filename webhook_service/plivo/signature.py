"""Plivo's V3 webhook signature (`X-Plivo-Signature-V3`), byte-compatible with Plivo's SDKs.

The string that Plivo signs is built exactly as `plivo.utils.signature_v3` builds it (the Node and
Ruby SDKs agree); see `../shared/reference/plivo-masking.md` §10.2:

* GET: the callback parameters merged with the URL's own query (the URL wins), as sorted `k=v`
  pairs joined by `&`, after `?`.
* POST: the URL's sorted query (if any), then `.`, then every parameter as `key + value`, sorted
  by key, with no separators. Nested JSON objects recurse; lists contribute one pair per value.
* then `.` + nonce, HMAC-SHA256 keyed with the auth token, Base64.

Unlike the SDK, which checks with `in`, the comparison here is constant-time, and it accepts any
of several auth tokens (during a token rotation both the new and the old one are valid).

Plivo sends two signatures of the same string with the same nonce (reference §10.1):
`X-Plivo-Signature-V3`, keyed with the token of the account that owns the resource (a subaccount's
own token for a session created with `subaccount`), and `X-Plivo-Signature-Ma-V3`, always keyed with
the main account's token. `verify_callback` accepts a callback when either one verifies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

SIGNATURE_HEADER = "X-Plivo-Signature-V3"
MA_SIGNATURE_HEADER = "X-Plivo-Signature-Ma-V3"
NONCE_HEADER = "X-Plivo-Signature-V3-Nonce"


def _fmt(value: Any) -> Any:
    # Mirrors the SDK's string_format: bytes are read one byte per character, numbers and
    # booleans use Python's str() (so JSON true signs as "True"), lists are formatted item by item.
    if isinstance(value, bytes):
        return "".join(chr(b) for b in value)
    if isinstance(value, bool | int | float):
        return str(value)
    if isinstance(value, list):
        return [_fmt(v) for v in value]
    return value


def _query_map(query: str) -> dict[str, list[str]]:
    return {k: v for k, v in parse_qs(query, keep_blank_values=True).items()}


def _sorted_query(params: Mapping[str, Any]) -> str:
    parts = []
    for key in sorted(params):
        value = params[key]
        if isinstance(value, list):
            parts.append("&".join(f"{_fmt(key)}={v}" for v in sorted(_fmt(value))))
        else:
            parts.append(f"{_fmt(key)}={_fmt(value)}")
    return "&".join(parts)


def _sorted_params(params: Mapping[str, Any]) -> str:
    if all(type(key) is str and type(value) is str for key, value in params.items()):
        return "".join(key + params[key] for key in sorted(params))  # the common case: a callback's strings
    parts = []
    for key in sorted(params):
        value = params[key]
        if isinstance(value, list):
            parts.append("".join(f"{_fmt(key)}{v}" for v in sorted(_fmt(value))))
        elif isinstance(value, dict):
            parts.append(f"{_fmt(key)}{_sorted_params(value)}")
        else:
            parts.append(f"{_fmt(key)}{_fmt(value)}")
    return "".join(parts)


def _base(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), parts.query


def string_to_sign(method: str, uri: str, params: Mapping[str, Any] | None) -> str:
    """The string (before `.nonce`) that Plivo signs for a callback to `uri` with `params`."""
    params = dict(params or {})
    base, query = _base(uri)
    if method == "GET":  # the SDK compares case-sensitively: anything else is signed as POST
        params.update(_query_map(query))
        pairs = _sorted_query(params)
        return base + ("?" + pairs if pairs else "")
    pairs = _sorted_query(_query_map(query))
    if not params:
        return base + ("?" + pairs if pairs else "")
    return base + "?" + pairs + ("." if pairs else "") + _sorted_params(params)


def sign(signed: str, nonce: str, token: str) -> str:
    """Base64 HMAC-SHA256 of `signed` + "." + nonce, as Plivo computes `X-Plivo-Signature-V3`."""
    # The SDK reads the nonce header's bytes one per character before re-encoding; do the same.
    nonce_chars = "".join(chr(b) for b in nonce.encode("utf-8"))
    message = f"{signed}.{nonce_chars}".encode()
    digest = hmac.new(token.encode("utf-8"), message, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def compute_signature(method: str, uri: str, params: Mapping[str, Any] | None, nonce: str, token: str) -> str:
    """Base64 HMAC-SHA256 signature, as Plivo puts it in `X-Plivo-Signature-V3`."""
    return sign(string_to_sign(method, uri, params), nonce, token)


def verify_signed(signed: str, nonce: str | None, header: str | None, tokens: Iterable[str]) -> bool:
    """True if any comma-separated signature in `header` is `signed`'s under any of `tokens`."""
    if not nonce or not header:
        return False
    try:
        expected = [sign(signed, nonce, t).encode() for t in tokens]
    except UnicodeEncodeError:  # lone surrogates cannot have been signed by Plivo
        return False
    ok = False
    for candidate in header.split(","):
        given = candidate.strip().encode("utf-8", "replace")
        for want in expected:
            # Keep looping after a match so the time taken does not reveal which value matched.
            ok |= hmac.compare_digest(given, want)
    return ok


def verify_signature(
    method: str,
    uri: str,
    params: Mapping[str, Any] | None,
    nonce: str | None,
    header: str | None,
    tokens: Iterable[str],
) -> bool:
    """True if any comma-separated signature in `header` matches under any of `tokens`."""
    try:
        signed = string_to_sign(method, uri, params)
    except (TypeError, RecursionError):
        # Values the SDK cannot sort (a JSON list mixing numbers and strings) or that nest without
        # end cannot have been signed by Plivo.
        return False
    return verify_signed(signed, nonce, header, tokens)


def verify_callback(
    signed: str,
    nonce: str | None,
    v3_header: str | None,
    ma_v3_header: str | None,
    main_tokens: Iterable[str],
    subaccount_tokens: Iterable[str] = (),
) -> bool:
    """True if `X-Plivo-Signature-V3` verifies under the main or a subaccount token, or
    `X-Plivo-Signature-Ma-V3` under the main account's token.

    Ma-V3 is never checked against a subaccount token: Plivo signs it with the main account's
    only, and a subaccount's holder must not be able to sign as the main account. Both headers
    are always checked (no early return), so the time taken does not tell which one verified.
    """
    main_tokens = tuple(main_tokens)
    v3_ok = verify_signed(signed, nonce, v3_header, (*main_tokens, *subaccount_tokens))
    ma_ok = verify_signed(signed, nonce, ma_v3_header, main_tokens)
    return v3_ok | ma_ok
