"""gunicorn settings, reasoned for this service (override any of them with the env vars named here).

* Workers: WEB_CONCURRENCY processes (default 2 per core) of gevent workers (GUNICORN_WORKER_CLASS,
  default `gevent`): each connection is a greenlet, not a thread, so connections that drip their
  request (a "slowloris"), send their body slowly or never read their answer hold a few KB each,
  not one of a handful of threads; GUNICORN_WORKER_CONNECTIONS (default 1000) bounds them per
  worker. gunicorn's gevent worker gives each request's headers `keepalive` seconds in all: a
  connection still sending its headers then is closed (counted in /metrics). Database work stays
  bounded by each worker's pool (DB_POOL_SIZE, default 5, plus as much overflow): a request beyond
  it waits DB_CONNECT_TIMEOUT for a connection, then is answered 503. `GUNICORN_WORKER_CLASS=gthread`
  brings back the threaded worker (GUNICORN_THREADS threads, default 4), which a few slow clients
  starve; it is kept for comparison (bench/slow_clients.py, bench/webhooks.py --worker-class).
* Timeouts: Plivo API calls time out after PLIVO_CONNECT_TIMEOUT + PLIVO_READ_TIMEOUT (≈13 s),
  so a request can never need the 30 s worker timeout; a worker stuck longer is killed.
* Graceful shutdown: on SIGTERM a worker finishes its in-flight requests for up to
  graceful_timeout seconds; each callback is committed or not at all, so nothing is half-applied.
* Never exposed directly in production: nginx in front buffers slow clients (deploy/nginx/,
  docs/deploy.md). The gevent worker is what keeps `make run`, a Procfile platform or a
  misconfigured deploy standing when gunicorn does face the clients.
* Logs: gunicorn's own lines (starting, workers booting and exiting, signals, crashes) are JSON records
  through the app's formatter, like every other line; its access line is off (the app writes one).
* Metrics: without PROMETHEUS_MULTIPROC_DIR, the workers' samples go to a temporary folder this server
  makes, and deletes when it exits.
* Request limits: gunicorn refuses a request line, header or header count over these limits itself,
  with an HTML page the app never sees (414, 431). They are set for what this service receives, and
  the TLS proxy in front refuses the same requests first, in the JSON shape (docs/deploy.md).
"""

import multiprocessing
import os
import tempfile

bind = os.environ.get("GUNICORN_BIND") or f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count() * 2))
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
worker_class_name = os.environ.get("GUNICORN_WORKER_CLASS", "gevent")
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "1000"))
timeout = 30
graceful_timeout = 20
# Behind a load balancer, keep connections for reuse. Under gevent it is also the time a request's
# headers may take in all (gunicorn's `timeout_ctx`): a slowloris is closed after it.
keepalive = 5
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "0"))  # 0: workers are not recycled
max_requests_jitter = max_requests // 10
accesslog = None  # the app writes one JSON line per request itself
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# gunicorn's own lines (starting, workers booting and exiting, signals, a worker's crash) in the app's JSON
# shape, one line per record, on stderr. The formatter's module imports neither psycopg nor the app.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "webhook_service.logs.JsonFormatter"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"},
                 "none": {"class": "logging.NullHandler"}},
    "root": {"level": loglevel.upper(), "handlers": ["stderr"]},
    "loggers": {
        "gunicorn.error": {"level": loglevel.upper(), "handlers": [], "propagate": True},
        # With a logging configuration gunicorn writes an access line per request: the app's is the one kept.
        "gunicorn.access": {"level": "INFO", "handlers": ["none"], "propagate": False},
    },
}
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# The longest request line is a GET callback (CALLBACK_METHOD=GET) carrying every Plivo parameter,
# about 1.5 KB, or a list query with every filter; 4094 (gunicorn's default) leaves room for both.
limit_request_line = 4094
# Plivo sends about ten headers and our callers as many; a proxy adds a few (default: 100).
limit_request_fields = 50
# The longest header is X-Plivo-Signature-V3 with a signature per token during a rotation, or
# Authorization: a few hundred bytes (default: 8190). It also bounds a chunk-size line.
limit_request_field_size = 4096

# Prometheus metrics summed across workers: each worker writes its samples to this folder. Unless
# PROMETHEUS_MULTIPROC_DIR names one, it is a temporary folder of this server's, deleted when it exits.
METRICS_DIR_PREFIX = "webhook-service-metrics-"
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=METRICS_DIR_PREFIX)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    # Only the folder made above (a configuration reload runs this file again, finding the variable set:
    # the folder is recognised by where it is and its name, not by a variable of this module's).
    import shutil
    from pathlib import Path

    folder = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""))
    if folder.name.startswith(METRICS_DIR_PREFIX) and folder.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(folder, ignore_errors=True)


def _gevent_worker():
    """gunicorn's gevent worker, counting its connections and what it refuses before the app runs.

    Defined here, not in the package: gunicorn imports the worker class in the master, before the
    worker's monkey-patching, and the package imports psycopg, which must be imported after it
    (psycopg then waits on its sockets through gevent; `post_worker_init` checks that).
    """
    import gevent
    from gunicorn.http import errors as http_errors
    from gunicorn.workers.ggevent import GeventWorker
    from prometheus_client import Counter, Gauge

    open_connections = Gauge(
        "gunicorn_connections_open", "TCP connections this server's workers hold (being read, served or kept alive)",
        multiprocess_mode="livesum")
    refused = Counter(
        "gunicorn_requests_refused_total",
        "Requests gunicorn refused before the app ran: slow_headers (a new connection's request headers not"
        " complete within `keepalive` seconds), line_too_long (414), headers_too_large (431)", ["reason"])
    too_large = {http_errors.LimitRequestLine: "line_too_long", http_errors.LimitRequestHeaders: "headers_too_large"}
    served = {}  # greenlet -> requests served on its connection

    class HeaderDeadline(gevent.Timeout):
        """`keepalive` seconds for a request's headers; on expiry the connection is closed quietly.
        Counted when it is the connection's first request: an idle kept-alive connection is normal."""

        def __exit__(self, kind, value, traceback):
            self.cancel()
            if value is self:
                if not served.get(gevent.getcurrent()):
                    refused.labels("slow_headers").inc()
                return True  # req stays None: gunicorn closes the connection
            return False

    class Worker(GeventWorker):
        def timeout_ctx(self):
            return HeaderDeadline(self.cfg.keepalive)

        def handle(self, listener, client, addr):
            open_connections.inc()
            served[gevent.getcurrent()] = 0
            try:
                super().handle(listener, client, addr)
            finally:
                served.pop(gevent.getcurrent(), None)
                open_connections.dec()

        def handle_request(self, listener_name, req, sock, addr):
            try:
                return super().handle_request(listener_name, req, sock, addr)
            finally:
                current = gevent.getcurrent()
                if current in served:
                    served[current] += 1

        def handle_error(self, req, client, addr, exc):
            for kind, reason in too_large.items():
                if isinstance(exc, kind):
                    refused.labels(reason).inc()
            super().handle_error(req, client, addr, exc)

    return Worker


if worker_class_name == "gevent":
    worker_class = _gevent_worker()
else:
    worker_class = worker_class_name


def post_worker_init(worker):
    # Under gevent, psycopg must wait on its sockets through gevent's hub, not in C (which would
    # stop every greenlet of the worker during each query). It chooses once, when first imported.
    if worker_class_name == "gevent":
        import psycopg.waiting

        if psycopg.waiting.wait is psycopg.waiting.wait_c:
            raise RuntimeError("psycopg was imported before gevent patched the worker; it would block the worker")
