"""The nginx in front (deploy/nginx/), as /metrics reports it: an adapter read at each scrape.

* `nginx_connections{state}` and `nginx_connections_accepted_total`, `nginx_http_requests_total`: its
  stub_status (NGINX_STATUS_URL). `reading` is connections whose request headers are still arriving
  (where a slowloris sits), `writing` those being served (slow bodies and slow readers among them),
  `waiting` idle kept-alive ones.
* `nginx_requests_refused_total{status}`: the lines of its refused log (NGINX_REFUSED_LOG), one per
  request refused for slowness or size: 408 (headers or body too slow), 413 (body too large),
  414 and 494 (request line or headers too long), 429 (over the per-client connection limit).
  Read from where the previous scrape stopped; a rotated or truncated log starts the count again
  (a counter reset, which Prometheus expects).

Every gunicorn worker reads the same sources, so whichever answers a scrape gives the same figures.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

_STUB_STATUS = re.compile(r"Active connections:\s*(\d+).*?(\d+)\s+(\d+)\s+(\d+)\s*"
                          r"Reading:\s*(\d+)\s*Writing:\s*(\d+)\s*Waiting:\s*(\d+)", re.S)


class RefusedLog:
    """Counts a refused log's lines by status, reading only what was added since the last call."""

    def __init__(self, path: str):
        self.path = path
        self._inode: int | None = None
        self._offset = 0
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def counts(self) -> dict[str, int]:
        with self._lock:
            try:
                with open(self.path, "rb") as log_file:
                    stat = os.fstat(log_file.fileno())
                    if stat.st_ino != self._inode or stat.st_size < self._offset:  # rotated or truncated
                        self._inode, self._offset, self._counts = stat.st_ino, 0, Counter()
                    log_file.seek(self._offset)
                    data = log_file.read()
            except OSError:
                return dict(self._counts)
            complete = data.rfind(b"\n") + 1  # a line nginx is still writing is read next time
            for line in data[:complete].splitlines():
                fields = line.split()
                if len(fields) >= 2 and fields[1].isdigit():
                    self._counts[fields[1].decode()] += 1
            self._offset += complete
            return dict(self._counts)


class NginxCollector:
    """A Prometheus collector for the figures above (either source may be None)."""

    def __init__(self, status_url: str | None, refused_log: str | None):
        self.status_url = status_url
        self.refused = RefusedLog(refused_log) if refused_log else None

    def collect(self) -> Iterator[Metric]:
        if self.status_url:
            yield from self._stub_status()
        if self.refused:
            refused = CounterMetricFamily("nginx_requests_refused", "Requests nginx refused for slowness or size",
                                          labels=["status"])
            for status, count in sorted(self.refused.counts().items()):
                refused.add_metric([status], count)
            yield refused

    def _stub_status(self) -> Iterator[Metric]:
        try:
            with urllib.request.urlopen(self.status_url, timeout=1) as answer:  # noqa: S310 - an operator's URL
                body = answer.read(4096).decode("ascii", "replace")
        except OSError as exc:
            log.warning("metrics: could not read nginx's stub_status: %s", type(exc).__name__)
            return
        match = _STUB_STATUS.search(body)
        if not match:
            log.warning("metrics: nginx's stub_status is not in the expected form")
            return
        active, accepted, _handled, requests, reading, writing, waiting = map(int, match.groups())
        connections = GaugeMetricFamily("nginx_connections", "nginx's client connections, by state",
                                        labels=["state"])
        for state, value in (("active", active), ("reading", reading), ("writing", writing), ("waiting", waiting)):
            connections.add_metric([state], value)
        yield connections
        yield CounterMetricFamily("nginx_connections_accepted", "Client connections nginx accepted", value=accepted)
        yield CounterMetricFamily("nginx_http_requests", "Client requests nginx read", value=requests)
