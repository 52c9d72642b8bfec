"""gunicorn settings, reasoned for this service (override any of them with the env vars named here).

* Workers: the webhook path is short and mostly waits on Postgres, so a few processes with a
  few threads each use the cores without piling up connections: WEB_CONCURRENCY processes
  (default 2 per core) × GUNICORN_THREADS threads (default 4). Each worker's DB pool
  (DB_POOL_SIZE, default 5, plus as much overflow) covers its threads.
* Timeouts: Plivo API calls time out after PLIVO_CONNECT_TIMEOUT + PLIVO_READ_TIMEOUT (≈13 s),
  so a request can never need the 30 s worker timeout; a worker stuck longer is killed.
* Graceful shutdown: on SIGTERM a worker finishes its in-flight requests for up to
  graceful_timeout seconds; each callback is committed or not at all, so nothing is half-applied.
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
worker_class = "gthread"
timeout = 30
graceful_timeout = 20
keepalive = 5  # behind a load balancer, keep connections for reuse
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "0"))  # 0: workers are not recycled
max_requests_jitter = max_requests // 10
accesslog = None  # the app writes one JSON line per request itself
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# The longest request line is a GET callback (CALLBACK_METHOD=GET) carrying every Plivo parameter,
# about 1.5 KB, or a list query with every filter; 4094 (gunicorn's default) leaves room for both.
limit_request_line = 4094
# Plivo sends about ten headers and our callers as many; a proxy adds a few (default: 100).
limit_request_fields = 50
# The longest header is X-Plivo-Signature-V3 with a signature per token during a rotation, or
# Authorization: a few hundred bytes (default: 8190). It also bounds a chunk-size line.
limit_request_field_size = 4096

# Prometheus metrics summed across workers: each worker writes its samples to this folder.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="webhook-service-metrics-")


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
