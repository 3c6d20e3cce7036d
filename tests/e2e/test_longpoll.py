"""Long-poll semantics of wait_for_status (devbox and execution), checked with raw HTTP."""

from __future__ import annotations

import threading
import time

from _helpers import assert_json_error, describe


def _timed_post(raw, path, body, timeout=60):
    t0 = time.monotonic()
    r = raw.post(path, json=body, timeout=timeout)
    return r, time.monotonic() - t0


def test_devbox_wait_for_status_times_out_with_408(devbox, raw):
    path = f"/v1/devboxes/{devbox.id}/wait_for_status"
    r, elapsed = _timed_post(raw, path, {"statuses": ["suspended"], "timeout_seconds": 1})
    assert r.status_code == 408, describe(r)
    assert_json_error(r, 408)
    assert 0.8 <= elapsed <= 5, f"hold was {elapsed:.2f}s for timeout_seconds=1"

    # the Python SDK sends floats
    r, elapsed = _timed_post(raw, path, {"statuses": ["suspended", "failure"], "timeout_seconds": 1.5})
    assert r.status_code == 408, describe(r)
    assert 1.3 <= elapsed <= 5.5, f"hold was {elapsed:.2f}s for timeout_seconds=1.5"

    assert devbox.get_info().status == "running"


def test_devbox_wait_for_status_returns_at_once_when_reached(devbox, raw):
    path = f"/v1/devboxes/{devbox.id}/wait_for_status"
    r, elapsed = _timed_post(raw, path, {"statuses": ["running"], "timeout_seconds": 20})
    assert r.status_code == 200, describe(r)
    assert elapsed < 3, f"took {elapsed:.2f}s although the status was already reached"
    body = r.json()
    assert body["id"] == devbox.id
    assert body["status"] == "running"

    # exactly what the SDK's await_running sends
    r, elapsed = _timed_post(raw, path, {"statuses": ["running", "failure", "shutdown"], "timeout_seconds": 30.0})
    assert r.status_code == 200, describe(r)
    assert elapsed < 3
    assert r.json()["status"] == "running"


def test_devbox_wait_for_status_wakes_on_transition(box_factory, raw, client):
    box = box_factory.create()
    result = {}

    def waiter():
        result["resp"], result["elapsed"] = _timed_post(
            raw, f"/v1/devboxes/{box.id}/wait_for_status", {"statuses": ["shutdown"], "timeout_seconds": 25}
        )
        result["done_at"] = time.monotonic()

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    time.sleep(1.0)
    assert t.is_alive(), "wait_for_status returned before the box was shut down"
    client.devboxes.shutdown(box.id)
    shut_at = time.monotonic()
    t.join(timeout=30)
    assert not t.is_alive()
    r = result["resp"]
    assert r.status_code == 200, describe(r)
    assert r.json()["status"] == "shutdown"
    assert result["done_at"] - shut_at < 5, "the waiter was not woken promptly by the status change"


def test_execution_wait_for_status_times_out_with_408(devbox, raw):
    ex = devbox.cmd.exec_async("sleep 30")
    try:
        path = f"/v1/devboxes/{devbox.id}/executions/{ex.execution_id}/wait_for_status"
        r, elapsed = _timed_post(raw, path, {"statuses": ["completed"], "timeout_seconds": 1})
        assert r.status_code == 408, describe(r)
        assert_json_error(r, 408)
        assert 0.8 <= elapsed <= 5, f"hold was {elapsed:.2f}s for timeout_seconds=1"

        # a status that is already reached answers at once
        r, elapsed = _timed_post(raw, path, {"statuses": ["running", "completed"], "timeout_seconds": 20})
        assert r.status_code == 200, describe(r)
        assert elapsed < 3
        body = r.json()
        assert body["status"] == "running"
        assert body["execution_id"] == ex.execution_id
        assert body["devbox_id"] == devbox.id
    finally:
        ex.kill()


def test_execution_wait_for_status_wakes_on_completion(devbox, raw):
    ex = devbox.cmd.exec_async("sleep 2; echo done")
    path = f"/v1/devboxes/{devbox.id}/executions/{ex.execution_id}/wait_for_status"
    r, elapsed = _timed_post(raw, path, {"statuses": ["completed"], "timeout_seconds": 20})
    assert r.status_code == 200, describe(r)
    assert elapsed < 8, f"completion took {elapsed:.2f}s to be reported"
    body = r.json()
    assert (body["status"], body["exit_status"], body["stdout"]) == ("completed", 0, "done\n")

    r, elapsed = _timed_post(raw, path, {"statuses": ["completed"], "timeout_seconds": 20})
    assert r.status_code == 200, describe(r)
    assert elapsed < 3
    assert r.json()["stdout"] == "done\n"
