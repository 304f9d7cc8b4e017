"""JSON over HTTP with the standard library only: timeouts, a rate limit, and retries with exponential backoff on
429 / 5xx / timeouts / dropped connections. Headers (which carry API keys) are never logged or put in errors."""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})


class HTTPFailure(Exception):
    """A request that failed for good (a non-retryable status, or retries exhausted)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class RateLimiter:
    """At most `per_minute` requests a minute, evenly spaced (0: unlimited). Thread safe."""

    def __init__(self, per_minute: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self.clock, self.sleep, self.next_t = clock, sleep, 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if self.interval <= 0:
            return
        with self.lock:
            now = self.clock()
            t = max(now, self.next_t)
            self.next_t = t + self.interval
        if t > now:
            self.sleep(t - now)


@dataclass
class HTTPClient:
    timeout: float = 60.0  # seconds per attempt
    retries: int = 5  # extra attempts after the first
    backoff: float = 1.0  # first wait; doubles each retry (capped by max_backoff)
    max_backoff: float = 60.0
    limiter: RateLimiter | None = None
    sleep: Callable[[float], None] = time.sleep

    def request(self, method: str, url: str, headers: dict[str, str], body: Any = None, raw: bool = False) -> Any:
        """Send `body` as JSON; return the decoded JSON answer (or the text when raw=True)."""
        data = json.dumps(body).encode() if body is not None else None
        hdrs = {"content-type": "application/json", "accept": "application/json", **headers}
        last = ""
        for attempt in range(self.retries + 1):
            if self.limiter is not None:
                self.limiter.wait()
            retry_after: float | None = None
            try:
                req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    text = resp.read().decode("utf-8", errors="replace")
                if raw:
                    return text
                try:
                    return json.loads(text)
                except json.JSONDecodeError as e:
                    raise HTTPFailure(f"{method} {url}: answer is not JSON ({e}): {text[:200]!r}") from e
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", errors="replace")[:300] if e.fp is not None else ""
                last = f"HTTP {e.code}: {detail}"
                if e.code not in RETRY_STATUS:
                    raise HTTPFailure(f"{method} {url}: {last}", e.code) from None
                retry_after = _retry_after(e.headers.get("retry-after") if e.headers else None)
            except (TimeoutError, socket.timeout) as e:
                last = f"timed out after {self.timeout}s ({e})"
            except urllib.error.URLError as e:
                if isinstance(e.reason, (TimeoutError, socket.timeout)):
                    last = f"timed out after {self.timeout}s"
                else:
                    last = f"connection failed: {e.reason}"
            except (ConnectionError, http_client_errors()) as e:
                last = f"connection dropped: {e!r}"
            if attempt < self.retries:
                wait = min(self.max_backoff, self.backoff * 2**attempt)
                self.sleep(max(wait, retry_after or 0.0) if retry_after is not None else wait)
        raise HTTPFailure(f"{method} {url}: giving up after {self.retries + 1} attempts; last error: {last}")


def http_client_errors() -> type[Exception]:
    import http.client
    return http.client.HTTPException


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), 300.0) if value is not None else None
    except ValueError:
        return None
