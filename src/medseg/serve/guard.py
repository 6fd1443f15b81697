"""What stands between the service and its clients: rate limits, the request log and TLS.

- :class:`RateLimiter`: a token bucket per client (the bearer token when there is one, else
  the client address), so that one client cannot fill the job queue for everyone.
- :class:`RequestLog`: one line per request (time, a pseudonymous client tag, method, route,
  status, milliseconds). Requests carry patient data in their bodies (DICOM headers, file
  names) and never in their routes, so the log takes only the route template (``/jobs/{id}``
  style paths with medseg's own job ids) and never a body, a file name, a query string or a
  header: no patient name or ID can reach it.
- :func:`tls_options`: the certificate and key of ``medseg serve --tls-cert/--tls-key``,
  checked before the server starts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

from medseg.errors import MedsegError

__all__ = ["REQUEST_LOGGER", "RateLimiter", "RequestLog", "client_key", "tls_options"]

REQUEST_LOGGER = "medseg.serve.requests"
# Paths the service answers (anything else is logged as "other"): job ids are medseg's own.
_ROUTES = (
    re.compile(r"^/jobs/[0-9a-f]{32}/result/[a-z_]{1,20}$"),
    re.compile(r"^/jobs/[0-9a-f]{32}$"),
    re.compile(r"^/(jobs|jobs/register|jobs/pacs|health|metrics|docs|openapi\.json|viewer)?$"),
    re.compile(r"^/static/[A-Za-z0-9._-]{1,100}$"),
)


def client_key(host: str | None) -> str:
    """Who a request comes from, as a pseudonymous tag: a hash of its address.

    The address, not the bearer token: a client cannot dodge its limit by sending made-up
    tokens, and the log does not hold addresses in clear.
    """
    return hashlib.sha256(f"medseg:{host or '?'}".encode()).hexdigest()[:12]


class RateLimiter:
    """Token buckets per client: ``per_minute`` requests on average, bursts of ``burst``.

    Parameters
    ----------
    per_minute
        Sustained requests per minute and client.
    burst
        Requests a client may make at once (default: a quarter of a minute's worth, at least 1).
    max_clients
        Buckets kept (least recently seen clients are forgotten first), so memory is bounded.
    """

    def __init__(self, per_minute: float, *, burst: float | None = None, max_clients: int = 4096):
        if per_minute <= 0:
            raise MedsegError(f"rate limit must be positive, got {per_minute}")
        self.rate = per_minute / 60.0
        self.burst = float(burst if burst is not None else max(1.0, per_minute / 4))
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, client: str, now: float | None = None) -> float:
        """0 when ``client`` may go ahead (a token is taken), else the seconds to wait."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[client] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return wait


class RequestLog:
    """One line per request to the ``medseg.serve.requests`` logger (and ``path``, if given)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.logger = logging.getLogger(REQUEST_LOGGER)
        self.logger.setLevel(logging.INFO)
        self.handler: logging.Handler | None = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.handler = logging.FileHandler(path, encoding="utf-8")
            self.handler.setFormatter(logging.Formatter("%(message)s"))
            self.logger.addHandler(self.handler)

    @staticmethod
    def route(path: str) -> str:
        """``path`` when it is one of the service's routes, else ``"other"``."""
        return path if any(r.match(path) for r in _ROUTES) else "other"

    def log(self, *, client: str, method: str, path: str, status: int, seconds: float) -> None:
        method = method if method.isalpha() and len(method) <= 10 else "OTHER"
        self.logger.info(
            "%s client=%s %s %s %d %.1fms",
            time.strftime("%Y-%m-%dT%H:%M:%S"),
            client,
            method,
            self.route(path),
            status,
            seconds * 1000,
        )

    def close(self) -> None:
        if self.handler is not None:
            self.logger.removeHandler(self.handler)
            self.handler.close()


def tls_options(cert: str | os.PathLike | None, key: str | os.PathLike | None) -> dict:
    """uvicorn's ``ssl_certfile``/``ssl_keyfile`` for a certificate and key, checked.

    Raises
    ------
    MedsegError
        When only one of them is given, or a file is missing or not PEM.
    """
    if cert is None and key is None:
        return {}
    if cert is None or key is None:
        raise MedsegError("--tls-cert and --tls-key go together (a PEM certificate and its key)")
    for path, kind in ((Path(cert), "CERTIFICATE"), (Path(key), "PRIVATE KEY")):
        try:
            text = path.read_text(errors="replace")
        except OSError as exc:
            raise MedsegError(f"{path}: cannot read ({exc.strerror})") from None
        if "-----BEGIN" not in text or kind not in text:
            raise MedsegError(f"{path}: not a PEM {kind.lower()}")
    return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
