"""SSE output streams (raw HTTP and the SDK's callbacks), stdin, and kill of a process group."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Iterator, List, Optional, Tuple

import pytest
import requests

from _helpers import assert_json_error, describe, wait_until

STREAM_TIMEOUT = (10, 40)  # connect, read (the server holds a stream at most 25 s without output)


def _lines(prefix: str, a: int, b: int) -> str:
    return "".join(f"{prefix}{i}\n" for i in range(a, b + 1))


# ------------------------------------------------------------------------------ helpers


class SSE:
    """Minimal text/event-stream reader over a streaming requests.Response."""

    def __init__(self, resp: requests.Response) -> None:
        self.resp = resp
        self._buf = b""
        self._chunks = resp.iter_content(chunk_size=None)
        self.ended = False

    def __iter__(self) -> Iterator[Tuple[str, Any]]:
        """Yields (event name, parsed JSON data); 'message' when the event has no name."""
        while True:
            while b"\n\n" not in self._buf:
                try:
                    chunk = next(self._chunks)
                except StopIteration:
                    self.ended = True
                    assert self._buf.strip() == b"", f"stream ended inside an event: {self._buf[:200]!r}"
                    return
                self._buf += chunk.replace(b"\r\n", b"\n")
            raw, self._buf = self._buf.split(b"\n\n", 1)
            name, data = "message", []
            for line in raw.decode("utf-8").split("\n"):
                if not line or line.startswith(":"):
                    continue
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    name = value
                elif field == "data":
                    data.append(value)
            if not data:
                continue
            yield name, json.loads("\n".join(data))

    def close(self) -> None:
        self.resp.close()


def open_stream(raw, devbox_id: str, eid: str, which: str = "stdout", offset: Optional[int] = None) -> SSE:
    params = {} if offset is None else {"offset": str(offset)}
    r = raw.get(
        f"/v1/devboxes/{devbox_id}/executions/{eid}/stream_{which}_updates",
        params=params,
        stream=True,
        timeout=STREAM_TIMEOUT,
        headers={"Accept": "text/event-stream"},
    )
    assert r.status_code == 200, describe(r)
    assert r.headers.get("content-type", "").startswith("text/event-stream"), r.headers
    return SSE(r)


class Collector:
    """Checks the {output, offset} contract while collecting: every chunk's offset is the byte
    position after it, chunks are contiguous from the start offset."""

    def __init__(self, start: int = 0) -> None:
        self.pos = start
        self.data = b""
        self.events = 0

    def add(self, name: str, payload: Any) -> None:
        assert name == "message", f"unexpected SSE event {name!r}: {payload!r}"
        assert set(payload) >= {"output", "offset"}, payload
        out = payload["output"].encode("utf-8")
        assert out, f"empty chunk: {payload!r}"
        assert payload["offset"] == self.pos + len(out), (
            f"offset {payload['offset']} is not the byte position after this chunk "
            f"(previous end {self.pos}, chunk of {len(out)} bytes)"
        )
        self.pos = payload["offset"]
        self.data += out
        self.events += 1

    @property
    def text(self) -> str:
        return self.data.decode("utf-8")


def start_async(raw, devbox_id: str, command: str, **extra: Any) -> str:
    r = raw.post(f"/v1/devboxes/{devbox_id}/execute_async", json={"command": command, **extra})
    assert r.status_code == 200, describe(r)
    return r.json()["execution_id"]


def wait_exec(raw, devbox_id: str, eid: str, statuses=("completed",), timeout: int = 25, last_n: str = "1000") -> Any:
    r = raw.post(
        f"/v1/devboxes/{devbox_id}/executions/{eid}/wait_for_status",
        params={"last_n": last_n},
        json={"statuses": list(statuses), "timeout_seconds": timeout},
        timeout=timeout + 10,
    )
    assert r.status_code == 200, describe(r)
    return r.json()


def exec_status(raw, devbox_id: str, eid: str) -> str:
    r = raw.get(f"/v1/devboxes/{devbox_id}/executions/{eid}")
    assert r.status_code == 200, describe(r)
    return r.json()["status"]


# ------------------------------------------------------------------------------ SSE


def test_sse_streams_follow_output_and_end_with_the_process(devbox, raw):
    n = 40
    eid = start_async(raw, devbox.id, f"for i in $(seq 1 {n}); do echo line-$i; echo err-$i >&2; sleep 0.05; done")
    stream = open_stream(raw, devbox.id, eid, "stdout")
    col = Collector()
    status_during = None
    for name, payload in stream:
        col.add(name, payload)
        if status_during is None:
            status_during = exec_status(raw, devbox.id, eid)
    ended_at = time.monotonic()
    assert stream.ended
    assert col.text == _lines("line-", 1, n)
    assert col.events >= 2, "the output should arrive in several events while the command runs"
    assert status_during in ("running", "completed")
    # the stream ended because the process ended: it is completed (at most a drain period later)
    body = wait_exec(raw, devbox.id, eid, timeout=5)
    assert (body["status"], body["exit_status"]) == ("completed", 0)
    assert time.monotonic() - ended_at < 5

    # stderr of the same (completed) execution: served from the start, then the stream closes
    stream = open_stream(raw, devbox.id, eid, "stderr")
    col = Collector()
    for name, payload in stream:
        col.add(name, payload)
    assert col.text == _lines("err-", 1, n)

    # resume from any byte offset of a completed execution, also inside a line
    full = _lines("line-", 1, n).encode()
    for offset in (0, 1, 7, len(full) - 1):
        col = Collector(offset)
        for name, payload in open_stream(raw, devbox.id, eid, "stdout", offset):
            col.add(name, payload)
        assert col.data == full[offset:], offset
    # offset at the end: nothing more, and the stream closes at once
    t0 = time.monotonic()
    events = list(open_stream(raw, devbox.id, eid, "stdout", len(full)))
    assert events == []
    assert time.monotonic() - t0 < 3


def test_sse_stream_opened_before_output_waits_for_it(devbox, raw):
    eid = start_async(raw, devbox.id, "sleep 2; echo late; sleep 1; echo later >&2")
    t0 = time.monotonic()
    col = Collector()
    for name, payload in open_stream(raw, devbox.id, eid, "stdout"):
        col.add(name, payload)
    elapsed = time.monotonic() - t0
    assert col.text == "late\n"
    assert 2.5 <= elapsed < 10, f"stream lasted {elapsed:.1f}s; the process ran about 3 s"
    assert wait_exec(raw, devbox.id, eid, timeout=5)["status"] == "completed"


def test_sse_reconnect_by_offset_loses_and_repeats_nothing(devbox, raw):
    n = 80
    eid = start_async(raw, devbox.id, f"for i in $(seq 1 {n}); do echo line-$i; sleep 0.05; done")
    expected = _lines("line-", 1, n).encode()

    # first connection: read about ten lines, then drop it
    stream = open_stream(raw, devbox.id, eid, "stdout")
    first = Collector()
    for name, payload in stream:
        first.add(name, payload)
        if first.data.count(b"\n") >= 10:
            break
    stream.close()
    assert expected.startswith(first.data)
    assert exec_status(raw, devbox.id, eid) == "running", "the command finished before we reconnected"

    # reconnect from the last offset while the command is still running
    second = Collector(first.pos)
    stream = open_stream(raw, devbox.id, eid, "stdout", first.pos)
    for name, payload in stream:
        second.add(name, payload)
        if second.data.count(b"\n") >= 20:
            break
    stream.close()

    # and once more, to the end
    third = Collector(second.pos)
    for name, payload in open_stream(raw, devbox.id, eid, "stdout", second.pos):
        third.add(name, payload)
    assert first.data + second.data + third.data == expected
    assert third.pos == len(expected)


def test_sdk_stream_callbacks_see_every_line_in_order(devbox):
    n = 150
    lock = threading.Lock()
    got = {"out": [], "err": [], "all": []}

    def collect(key):
        def cb(text: str) -> None:
            with lock:
                got[key].append(text)

        return cb

    r = devbox.cmd.exec(
        f"for i in $(seq 1 {n}); do echo out-$i; echo err-$i >&2; [ $((i % 25)) = 0 ] && sleep 0.2; done; true",
        stdout=collect("out"),
        stderr=collect("err"),
        output=collect("all"),
    )
    assert r.exit_code == 0
    out_lines = [f"out-{i}" for i in range(1, n + 1)]
    err_lines = [f"err-{i}" for i in range(1, n + 1)]
    assert "".join(got["out"]).splitlines() == out_lines
    assert "".join(got["err"]).splitlines() == err_lines
    # `output` gets both streams: each chunk is whole lines of one stream (from the stream's
    # own order), so both subsequences are in order
    combined = "".join(got["all"]).splitlines()
    assert [x for x in combined if x.startswith("out-")] == out_lines
    assert [x for x in combined if x.startswith("err-")] == err_lines
    assert len(combined) == 2 * n


@pytest.mark.slow
@pytest.mark.deadline(60)
def test_sse_stream_idle_past_the_hold_ends_with_408_error_event(devbox, raw):
    eid = start_async(raw, devbox.id, "echo start; sleep 60")
    try:
        t0 = time.monotonic()
        stream = open_stream(raw, devbox.id, eid, "stdout")
        events: List[Tuple[str, Any, float]] = []
        for name, payload in stream:
            events.append((name, payload, time.monotonic() - t0))
        assert stream.ended
        assert [(e[0], e[1]) for e in events[:1]] == [("message", {"output": "start\n", "offset": 6})], events
        assert len(events) == 2, events
        name, payload, at = events[1]
        assert name == "error", events
        assert payload.get("code") == 408, payload
        assert 20 <= at <= 35, f"the 408 came after {at:.1f}s; the server hold is 25 s"
        assert exec_status(raw, devbox.id, eid) == "running"
    finally:
        raw.post(f"/v1/devboxes/{devbox.id}/executions/{eid}/kill", json={"kill_process_group": True})


@pytest.mark.slow
@pytest.mark.deadline(120)
def test_sdk_exec_longer_than_every_long_poll_hold(devbox):
    """~35 s through cmd.exec: the execution long poll answers 408 at least once and the SDK
    polls again; the stdout callback's SSE stream gets the 408 error event and reconnects by
    offset, without repeating 'begin'."""
    got: list = []
    t0 = time.monotonic()
    r = devbox.cmd.exec("echo begin; sleep 35; echo done", stdout=got.append)
    elapsed = time.monotonic() - t0
    assert (r.exit_code, elapsed >= 35) == (0, True), (
        f"exit {r.exit_code} after {elapsed:.1f}s; stdout {r.stdout()!r}, stderr {r.stderr()!r}"
    )
    assert r.stdout() == "begin\ndone\n"
    assert "".join(got) == "begin\ndone\n"


# ------------------------------------------------------------------------------ stdin


def _stdin(raw, devbox_id: str, eid: str, body: Any) -> requests.Response:
    return raw.post(f"/v1/devboxes/{devbox_id}/executions/{eid}/send_std_in", json=body)


def _start_stdin_exec(raw, devbox_id: str, command: str) -> str:
    eid = start_async(raw, devbox_id, command, attach_stdin=True)
    wait_exec(raw, devbox_id, eid, statuses=("running", "completed"), timeout=20)
    return eid


def test_stdin_text_then_eof(devbox, raw):
    eid = _start_stdin_exec(raw, devbox.id, "cat")
    r = _stdin(raw, devbox.id, eid, {"text": "hello\n"})
    assert r.status_code == 200, describe(r)
    assert r.json() == {"devbox_id": devbox.id, "execution_id": eid, "success": True}
    time.sleep(0.5)
    assert exec_status(raw, devbox.id, eid) == "running", "cat ended before EOF"
    r = _stdin(raw, devbox.id, eid, {"signal": "EOF"})
    assert r.status_code == 200, describe(r)
    assert r.json()["success"] is True
    body = wait_exec(raw, devbox.id, eid, timeout=15)
    assert (body["status"], body["exit_status"], body["stdout"], body["stderr"]) == ("completed", 0, "hello\n", "")


def test_stdin_several_sends_arrive_in_order(devbox, raw):
    eid = _start_stdin_exec(raw, devbox.id, "cat; echo eof-seen >&2")
    parts = ["one\n", "two ", "three\n", "é€🚀\n", "no newline"]
    for p in parts:
        r = _stdin(raw, devbox.id, eid, {"text": p})
        assert r.status_code == 200, describe(r)
    assert _stdin(raw, devbox.id, eid, {"signal": "EOF"}).status_code == 200
    body = wait_exec(raw, devbox.id, eid, timeout=15)
    assert (body["exit_status"], body["stdout"], body["stderr"]) == (0, "".join(parts), "eof-seen\n")


def test_stdin_with_the_python_sdk(devbox):
    from runloop_api_client.sdk.execution import Execution

    assert hasattr(Execution, "send_std_in") and hasattr(Execution, "close_std_in")
    # Input sent right after exec_async returns (the execution may still be queued) must be
    # accepted; a few rounds, because whether it is still queued is a matter of timing.
    for i in range(5):
        ex = devbox.cmd.exec_async("while read -r l; do echo \"got:$l\"; done; echo bye", attach_stdin=True)
        ex.send_std_in(f"a{i}\n")
        ex.send_std_in("b\n")
        ex.close_std_in()
        res = ex.result()
        assert (res.exit_code, res.stdout(), res.stderr()) == (0, f"got:a{i}\ngot:b\nbye\n", "")


def test_stdin_interrupt_stops_the_command_with_130(devbox, raw):
    eid = _start_stdin_exec(raw, devbox.id, "sleep 100")
    t0 = time.monotonic()
    r = _stdin(raw, devbox.id, eid, {"signal": "INTERRUPT"})
    assert r.status_code == 200, describe(r)
    body = wait_exec(raw, devbox.id, eid, timeout=10)
    assert time.monotonic() - t0 < 5
    assert (body["status"], body["exit_status"]) == ("completed", 130)


def test_stdin_bad_bodies_are_400(devbox, raw):
    eid = _start_stdin_exec(raw, devbox.id, "cat")
    try:
        for body in (
            {"text": "x", "signal": "EOF"},
            {},
            {"text": ""},
            {"signal": "KILL"},
            {"signal": ""},
            {"text": None, "signal": None},
        ):
            r = _stdin(raw, devbox.id, eid, body)
            assert_json_error(r, 400)
        r = raw.post(
            f"/v1/devboxes/{devbox.id}/executions/{eid}/send_std_in",
            data="not json",
            headers={"Content-Type": "application/json"},
        )
        assert_json_error(r)
        # none of this disturbed the execution: it still takes input
        assert exec_status(raw, devbox.id, eid) == "running"
        assert _stdin(raw, devbox.id, eid, {"text": "still here\n"}).status_code == 200
        assert _stdin(raw, devbox.id, eid, {"signal": "EOF"}).status_code == 200
        body = wait_exec(raw, devbox.id, eid, timeout=15)
        assert (body["exit_status"], body["stdout"]) == (0, "still here\n")
    finally:
        raw.post(f"/v1/devboxes/{devbox.id}/executions/{eid}/kill", json={})


def test_stdin_without_attach_stdin_is_rejected(devbox, raw):
    eid = start_async(raw, devbox.id, "sleep 30")
    try:
        wait_exec(raw, devbox.id, eid, statuses=("running",), timeout=20)
        r = _stdin(raw, devbox.id, eid, {"text": "hello\n"})
        assert_json_error(r)
        assert exec_status(raw, devbox.id, eid) == "running"
    finally:
        raw.post(f"/v1/devboxes/{devbox.id}/executions/{eid}/kill", json={})

    # ...and so is input for an execution that has completed
    eid = _start_stdin_exec(raw, devbox.id, "cat")
    wait_until(lambda: _eof_until_done(raw, devbox.id, eid), timeout=20, what="cat to complete")
    assert_json_error(_stdin(raw, devbox.id, eid, {"text": "late\n"}))

    # unknown execution
    assert_json_error(_stdin(raw, devbox.id, "exe_doesnotexist", {"text": "x"}), 404)


def _eof_until_done(raw, devbox_id: str, eid: str) -> bool:
    if exec_status(raw, devbox_id, eid) == "completed":
        return True
    _stdin(raw, devbox_id, eid, {"signal": "EOF"})
    return False


# ------------------------------------------------------------------------------ kill


def test_kill_process_group_stops_every_process_at_once(devbox, raw):
    eid = start_async(raw, devbox.id, "bash -c 'sleep 100 & sleep 100; wait'")
    wait_until(
        lambda: devbox.cmd.exec("pgrep -c -x sleep || true").stdout().strip() == "2",
        timeout=20,
        what="both sleeps to be running",
    )
    t0 = time.monotonic()
    r = raw.post(f"/v1/devboxes/{devbox.id}/executions/{eid}/kill", json={"kill_process_group": True})
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, describe(r)
    body = r.json()
    assert (body["status"], body["exit_status"]) == ("completed", 137), body
    assert body["execution_id"] == eid
    assert elapsed < 1.0, f"kill took {elapsed:.2f}s"

    r = devbox.cmd.exec("pgrep -a -x sleep; echo rc=$?")
    assert r.stdout() == "rc=1\n", f"processes left after kill: {r.stdout()!r}"

    # killing again is harmless and reports the same outcome
    r = raw.post(f"/v1/devboxes/{devbox.id}/executions/{eid}/kill", json={"kill_process_group": True})
    assert r.status_code == 200, describe(r)
    assert (r.json()["status"], r.json()["exit_status"]) == ("completed", 137)
