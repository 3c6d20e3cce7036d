"""Durable executions: a server crash (SIGKILL) and restart on the same data dir loses neither
running commands, their output, completed results nor background daemons; and daemons started
from a command outlive it without holding it open.

The crash test runs its own devboxd (the `private_server` fixture below), never the shared
session server.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from runloop_api_client import Runloop, RunloopSDK

from _helpers import RawSession, describe, wait_until
from _server import EXTRA_LOGS_KEY, PrivateServer, ServerStartError, binary_path

SLOW_LINES = 40
SLOW_CMD = f"for i in $(seq 1 {SLOW_LINES}); do echo line-$i; echo err-$i >&2; sleep 0.25; done"


def _expected(prefix: str, n: int) -> str:
    return "".join(f"{prefix}-{i}\n" for i in range(1, n + 1))


class _Private:
    """A private server plus clients bound to it (the port stays the same across restarts)."""

    def __init__(self, srv: PrivateServer) -> None:
        self.srv = srv
        self.sdk = RunloopSDK(base_url=srv.base_url, bearer_token=srv.key)
        self.client: Runloop = self.sdk.api
        self.raw = RawSession(srv.base_url, srv.key)


@pytest.fixture
def private_server(request: pytest.FixtureRequest) -> Any:
    bin_path = binary_path()
    if not bin_path.is_file():
        pytest.fail(f"devboxd binary not found: {bin_path} (set DEVBOXD_BIN)", pytrace=False)
    srv = PrivateServer()
    request.node.stash.setdefault(EXTRA_LOGS_KEY, []).append(("private devboxd log", srv.handle, 0))
    failed_before = request.session.testsfailed
    try:
        srv.start()
    except ServerStartError as e:
        srv.stop(keep=True)
        pytest.fail(str(e), pytrace=False)
    p = _Private(srv)
    try:
        yield p
    finally:
        p.raw.close()
        failed = request.session.testsfailed > failed_before
        for note in srv.stop(keep=failed):
            print(f"[e2e] {note}")


def _exec_state(client: Runloop, devbox_id: str, eid: str, last_n: str = "1000") -> Any:
    return client.devboxes.executions.retrieve(eid, devbox_id=devbox_id, last_n=last_n)


def _sleepers(box: Any) -> list:
    """`pgrep -a -x sleep` lines inside the box (matches only processes named `sleep`)."""
    r = box.cmd.exec("pgrep -a -x sleep || true")
    assert r.exit_code == 0, (r.stdout(), r.stderr())
    return [line.split(None, 1)[1] for line in r.stdout().splitlines() if " " in line]


@pytest.mark.slow
@pytest.mark.deadline(240)
def test_executions_survive_server_crash_and_restart(private_server):
    p = private_server
    box = p.sdk.devbox.create(name="e2e-durable")

    # Before the crash: a completed command, and a daemon.
    done = box.cmd.exec("echo before-crash; echo err-before >&2; exit 7")
    assert (done.exit_code, done.stdout(), done.stderr()) == (7, "before-crash\n", "err-before\n")
    daemon = box.cmd.exec("nohup sleep 300 >/dev/null 2>&1 &")
    assert daemon.exit_code == 0, daemon.stderr()
    assert "sleep 300" in _sleepers(box)

    # A slow command that prints numbered lines, and one that will finish while the server is down.
    slow = box.cmd.exec_async(SLOW_CMD)
    wait_until(
        lambda: "line-8\n" in (_exec_state(p.client, box.id, slow.execution_id).stdout or ""),
        timeout=30,
        what="the slow command to print 8 lines",
    )
    short = box.cmd.exec_async("sleep 1; echo finished-while-down; echo e >&2; exit 5")
    st = _exec_state(p.client, box.id, slow.execution_id)
    assert st.status == "running", st
    lines_before = st.stdout.count("\n")
    assert lines_before < SLOW_LINES - 10, f"the command ran too far before the crash: {lines_before} lines"

    p.srv.crash()
    time.sleep(2.0)  # the box keeps running and printing while no server is there
    p.srv.start()

    # The devbox is still there and running.
    info = p.sdk.devbox.from_id(box.id).get_info()
    assert info.status == "running", info

    # The slow command ends normally with all of its output, each line exactly once, in order.
    final = p.client.devboxes.wait_for_command(
        slow.execution_id, devbox_id=box.id, statuses=["completed"], last_n="1000", timeout=60
    )
    assert final.status == "completed"
    assert final.exit_status == 0, (
        f"exit {final.exit_status} after {final.stdout.count(chr(10))} lines; stderr tail: {final.stderr[-500:]!r}"
    )
    assert final.stdout == _expected("line", SLOW_LINES)
    assert final.stderr == _expected("err", SLOW_LINES)
    assert final.stdout_truncated is False and final.stderr_truncated is False
    streamed = "".join(
        c.output for c in p.client.devboxes.executions.stream_stdout_updates(slow.execution_id, devbox_id=box.id)
    )
    assert streamed == _expected("line", SLOW_LINES)
    streamed = "".join(
        c.output for c in p.client.devboxes.executions.stream_stderr_updates(slow.execution_id, devbox_id=box.id)
    )
    assert streamed == _expected("err", SLOW_LINES)

    # The one that finished while the server was down reports its real outcome.
    v = p.client.devboxes.wait_for_command(short.execution_id, devbox_id=box.id, statuses=["completed"], timeout=60)
    assert (v.status, v.exit_status, v.stdout, v.stderr) == ("completed", 5, "finished-while-down\n", "e\n")

    # The command completed before the crash still answers with its output and exit code.
    v = _exec_state(p.client, box.id, done.execution_id)
    assert (v.status, v.exit_status, v.stdout, v.stderr) == ("completed", 7, "before-crash\n", "err-before\n")
    r = p.raw.post(
        f"/v1/devboxes/{box.id}/executions/{done.execution_id}/wait_for_status",
        json={"statuses": ["completed"], "timeout_seconds": 5},
    )
    assert r.status_code == 200, describe(r)
    assert (r.json()["exit_status"], r.json()["stdout"]) == (7, "before-crash\n")

    # The daemon started before the crash is still running.
    assert "sleep 300" in _sleepers(box)

    # New executions work: synchronous, asynchronous with streaming, and files.
    r = box.cmd.exec("echo after-restart; echo e2 >&2; exit 2")
    assert (r.exit_code, r.stdout(), r.stderr()) == (2, "after-restart\n", "e2\n")
    got: list = []
    r = box.cmd.exec("for i in 1 2 3; do echo n$i; sleep 0.1; done", stdout=got.append)
    assert r.exit_code == 0 and r.stdout() == "n1\nn2\nn3\n"
    assert "".join(got) == "n1\nn2\nn3\n"
    box.file.write(file_path="after.txt", contents="written after restart\n")
    assert box.file.read(file_path="after.txt") == "written after restart\n"

    box.shutdown()
    assert box.get_info().status == "shutdown"


@pytest.mark.slow
@pytest.mark.deadline(180)
def test_completed_results_survive_a_second_restart(private_server):
    """A graceful-less restart twice in a row: results written by the first restarted server are
    still there after the second crash, and the exit code of a command that was running during
    both crashes is right."""
    p = private_server
    box = p.sdk.devbox.create(name="e2e-durable-twice")
    ex = box.cmd.exec_async("for i in $(seq 1 24); do echo t-$i; sleep 0.25; done; exit 9")
    wait_until(
        lambda: "t-3\n" in (_exec_state(p.client, box.id, ex.execution_id).stdout or ""),
        timeout=30,
        what="output before the first crash",
    )
    p.srv.crash()
    p.srv.start()
    wait_until(
        lambda: "t-12\n" in (_exec_state(p.client, box.id, ex.execution_id).stdout or ""),
        timeout=30,
        what="output between the crashes",
    )
    p.srv.crash()
    p.srv.start()
    v = p.client.devboxes.wait_for_command(
        ex.execution_id, devbox_id=box.id, statuses=["completed"], last_n="100", timeout=60
    )
    assert (v.status, v.exit_status, v.stdout) == ("completed", 9, _expected("t", 24))
    after = box.cmd.exec("echo ok")
    p.srv.crash()
    p.srv.start()
    v = _exec_state(p.client, box.id, ex.execution_id)
    assert (v.status, v.exit_status, v.stdout) == ("completed", 9, _expected("t", 24))
    v = _exec_state(p.client, box.id, after.execution_id)
    assert (v.status, v.exit_status, v.stdout) == ("completed", 0, "ok\n")
    assert p.sdk.devbox.from_id(box.id).get_info().status == "running"


DAEMON_CASES = [
    ("nohup sleep 301 >/dev/null 2>&1 &", "sleep 301"),
    ("nohup sleep 302 &", "sleep 302"),  # inherits the execution's stdout and stderr pipes
    ("setsid sleep 303", "sleep 303"),  # setsid forks (we lead a process group) and returns at once
    ("setsid -f sleep 304 >/dev/null 2>&1", "sleep 304"),
    ("(sleep 305 &) ; echo started", "sleep 305"),
]


@pytest.mark.parametrize("command,proc", DAEMON_CASES, ids=[c[1].replace(" ", "-") for c in DAEMON_CASES])
def test_daemon_outlives_its_execution_which_completes_promptly(devbox, client, command, proc):
    t0 = time.monotonic()
    r = devbox.cmd.exec(command)
    elapsed = time.monotonic() - t0
    assert r.exit_code == 0, (r.stdout(), r.stderr())
    assert elapsed < 3.0, f"{command!r} held its execution open for {elapsed:.1f}s"
    state = client.devboxes.executions.retrieve(r.execution_id, devbox_id=devbox.id)
    assert state.status == "completed"

    time.sleep(1.0)
    sleepers = _sleepers(devbox)
    assert proc in sleepers, f"daemon {proc!r} is gone after its execution completed: {sleepers}"
    # ...and it is still alive a little later (not killed when the execution was released)
    time.sleep(1.0)
    assert proc in _sleepers(devbox)

    # the daemon does not block later executions either
    t0 = time.monotonic()
    assert devbox.cmd.exec("echo next").stdout() == "next\n"
    assert time.monotonic() - t0 < 3.0
