"""Small helpers shared by the e2e tests (imported by conftest and the test modules)."""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Optional, TypeVar

import requests

from runloop_api_client import Runloop

T = TypeVar("T")

DEFAULT_RAW_TIMEOUT = 60


class RawSession(requests.Session):
    """requests.Session bound to the server: `raw.get("/v1/devboxes")`.

    `key=None` sends no Authorization header. Every request gets a timeout (60 s unless given).
    """

    def __init__(self, base_url: str, key: Optional[str]) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        if key is not None:
            self.headers["Authorization"] = f"Bearer {key}"

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if url.startswith("/"):
            url = self.base_url + url
        kwargs.setdefault("timeout", DEFAULT_RAW_TIMEOUT)
        return super().request(method, url, *args, **kwargs)


def shutdown_quietly(client: Runloop, devbox_id: str) -> None:
    """Best-effort shutdown (no retries, errors ignored): for fixture teardown."""
    try:
        client.with_options(max_retries=0, timeout=60).devboxes.shutdown(devbox_id)
    except Exception:
        pass


def wait_until(fn: Callable[[], T], *, timeout: float, interval: float = 0.25, what: str = "condition") -> T:
    """Call fn until it returns a truthy value; return it, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
        time.sleep(interval)


def describe(resp: requests.Response) -> str:
    body = resp.content[:500].decode("utf-8", "replace")
    return f"{resp.request.method} {resp.request.url} -> {resp.status_code} {resp.headers.get('content-type')!r}: {body}"


def assert_json_error(resp: requests.Response, status: Optional[int] = None) -> Any:
    """Assert a 4xx error (exactly `status` if given) whose body is a JSON object; return the body."""
    if status is not None:
        assert resp.status_code == status, describe(resp)
    assert 400 <= resp.status_code < 500, describe(resp)
    ctype = resp.headers.get("content-type", "")
    assert "json" in ctype.lower(), f"error body is not JSON: {describe(resp)}"
    try:
        body = json.loads(resp.content)
    except ValueError as e:  # pragma: no cover - failure path
        raise AssertionError(f"error body does not parse as JSON ({e}): {describe(resp)}") from None
    assert isinstance(body, dict) and body, f"error body should be a non-empty JSON object: {describe(resp)}"
    return body


def bash_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def expect_api_error(fn: Callable[[], Any], status: Optional[int] = None) -> Any:
    """Run an SDK call that must fail with an HTTP 4xx (exactly `status` if given); return the error."""
    from runloop_api_client import APIStatusError

    try:
        result = fn()
    except APIStatusError as e:
        code = e.status_code
        if status is not None:
            assert code == status, f"expected HTTP {status}, got {code}: {e.body!r}"
        assert 400 <= code < 500, f"expected a 4xx, got {code}: {e.body!r}"
        return e
    raise AssertionError(f"expected HTTP {status or '4xx'} error, call succeeded with {result!r}")
