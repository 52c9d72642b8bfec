"""The client's address for the request log: the proxy's word for it only when the proxy is trusted.

gunicorn leaves REMOTE_ADDR as the peer that connected (nginx, or the load balancer). The proxies in
front append the address they saw to `X-Forwarded-For`; anyone can send that header with invented
addresses in it. So the header is read only when the peer is in FORWARDED_ALLOW_IPS (the same list
gunicorn believes `X-Forwarded-Proto` from), and then from the right: every address a trusted proxy
appended is skipped, and the first one no trusted proxy owns is the client (nginx's
`real_ip_recursive`). An untrusted peer is logged as itself, whatever it sends.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """FORWARDED_ALLOW_IPS: `*`, or a comma-separated list of addresses and networks (CIDR)."""

    def __init__(self, spec: str):
        entries = [part.strip() for part in spec.split(",") if part.strip()]
        self.everyone = "*" in entries
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(entry, strict=False) for entry in entries if entry != "*")

    def __contains__(self, address: str | None) -> bool:
        if self.everyone:
            return True
        try:
            ip = ipaddress.ip_address((address or "").strip())
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def client(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The client's address: `peer` unless it is trusted and `forwarded_for` names another."""
        if peer not in self or not forwarded_for:
            return peer
        hops: Iterable[str] = reversed([hop.strip() for hop in forwarded_for.split(",")])
        client = peer
        for hop in hops:
            if not _is_address(hop):
                break  # garbage in the header: the last address that was believed stands
            client = hop
            if hop not in self:
                break
        return client


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
