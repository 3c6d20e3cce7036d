"""Named shells (`shell_name` on execute_async / execute / execute_sync): cwd and exported env
persist per shell, shells are independent, one shell runs its commands one after another; and the
official Python SDK 2.0.0 `devbox.shell(name)` (run in its own venv, in a subprocess)."""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List

import pytest
from uuid_utils import uuid7

from _helpers import describe
from _sdk_envs import SCRIPTS_DIR, run_json_script, sdk2_python  # noqa: F401  (fixture)

HOME = "/home/user"


def _async(raw, box_id: str, command: str, shell: str | None) -> Dict[str, Any]:
    body: Dict[str, Any] = {"command": command}
    if shell is not None:
        body["shell_name"] = shell
    r = raw.post(f"/v1/devboxes/{box_id}/execute_async", json=body)
    assert r.status_code == 200, describe(r)
    return r.json()


def _wait(raw, box_id: str, eid: str, timeout: int = 25) -> Dict[str, Any]:
    r = raw.post(
        f"/v1/devboxes/{box_id}/executions/{eid}/wait_for_status",
        json={"statuses": ["completed"], "timeout_seconds": timeout},
        timeout=timeout + 10,
    )
    assert r.status_code == 200, describe(r)
    return r.json()


def run_async(raw, box_id: str, command: str, shell: str | None) -> Dict[str, Any]:
    return _wait(raw, box_id, _async(raw, box_id, command, shell)["execution_id"])


def run_sync(raw, box_id: str, command: str, shell: str | None) -> Dict[str, Any]:
    body: Dict[str, Any] = {"command": command}
    if shell is not None:
        body["shell_name"] = shell
    r = raw.post(f"/v1/devboxes/{box_id}/execute_sync", json=body)
    assert r.status_code == 200, describe(r)
    return r.json()


def run_execute(raw, box_id: str, command: str, shell: str | None) -> Dict[str, Any]:
    body: Dict[str, Any] = {"command": command, "command_id": str(uuid7())}
    if shell is not None:
        body["shell_name"] = shell
    r = raw.post(f"/v1/devboxes/{box_id}/execute", json=body)
    assert r.status_code == 200, describe(r)
    v = r.json()
    if v["status"] != "completed":
        v = _wait(raw, box_id, v["execution_id"])
    return v


def _out(v: Dict[str, Any]) -> tuple:
    return (v["exit_status"], v["stdout"], v["stderr"])


def test_cwd_and_exported_env_persist_within_a_shell(devbox, raw):
    v = run_async(raw, devbox.id, "cd /tmp && export FOO=bar", "s1")
    assert _out(v) == (0, "", "")
    assert _out(run_sync(raw, devbox.id, 'pwd; echo "$FOO"', "s1")) == (0, "/tmp\nbar\n", "")
    assert _out(run_execute(raw, devbox.id, 'pwd; echo "$FOO"', "s1")) == (0, "/tmp\nbar\n", "")
    assert _out(run_async(raw, devbox.id, 'pwd; echo "$FOO"', "s1")) == (0, "/tmp\nbar\n", "")

    # change it again, through another endpoint; a later command sees the newest state
    v = run_execute(raw, devbox.id, "mkdir -p /tmp/deeper && cd /tmp/deeper; export FOO=baz BAR=2", "s1")
    assert v["exit_status"] == 0, v
    assert _out(run_sync(raw, devbox.id, 'pwd; echo "$FOO $BAR"', "s1")) == (0, "/tmp/deeper\nbaz 2\n", "")
    # values with spaces, quotes and newlines survive
    run_sync(raw, devbox.id, "export TRICKY=\"a b 'c' \\\"d\\\" \\$e\"$'\\n'\"line2\"", "s1")
    assert run_sync(raw, devbox.id, 'printf "%s|" "$TRICKY"', "s1")["stdout"] == "a b 'c' \"d\" $e\nline2|"
    # unset persists too
    run_sync(raw, devbox.id, "unset BAR", "s1")
    assert run_sync(raw, devbox.id, 'echo "${BAR-unset}"', "s1")["stdout"] == "unset\n"


def test_shells_are_independent_of_each_other_and_of_plain_commands(devbox, raw):
    run_sync(raw, devbox.id, "cd /tmp && export FOO=one", "a")
    run_sync(raw, devbox.id, "cd /var && export FOO=two", "b")
    probe = 'pwd; echo "${FOO:-unset}"'
    assert run_sync(raw, devbox.id, probe, "a")["stdout"] == "/tmp\none\n"
    assert run_sync(raw, devbox.id, probe, "b")["stdout"] == "/var\ntwo\n"
    assert run_sync(raw, devbox.id, probe, "fresh")["stdout"] == f"{HOME}\nunset\n"
    assert run_sync(raw, devbox.id, probe, None)["stdout"] == f"{HOME}\nunset\n"
    assert run_async(raw, devbox.id, probe, None)["stdout"] == f"{HOME}\nunset\n"
    # plain commands do not change any shell
    run_sync(raw, devbox.id, "cd / && export FOO=plain", None)
    assert run_sync(raw, devbox.id, probe, "a")["stdout"] == "/tmp\none\n"


def test_commands_of_one_shell_run_one_after_another(devbox, raw):
    order = "/tmp/order-ser"
    step = f"echo start-$N >> {order}; sleep 0.4; echo end-$N >> {order}"

    # submitted one after another (execute_async returns at once): first in, first run. A few
    # rounds of several commands each, because a wrong order depends on scheduling.
    for rnd in range(3):
        fifo = f"/tmp/order-fifo-{rnd}"
        eids = [
            _async(raw, devbox.id, f"echo {i} >> {fifo}; sleep 0.05", f"fifo-{rnd}")["execution_id"] for i in range(8)
        ]
        results = [_wait(raw, devbox.id, e) for e in eids]
        assert all(r["exit_status"] == 0 for r in results), results
        got = run_sync(raw, devbox.id, f"cat {fifo}", None)["stdout"].split()
        assert got == [str(i) for i in range(8)], f"round {rnd}: commands of one shell ran out of order: {got}"

    # the same with the slower step, all in one shell
    eids = [_async(raw, devbox.id, step.replace("$N", str(i)), "ser")["execution_id"] for i in range(4)]
    results = [_wait(raw, devbox.id, e) for e in eids]
    assert all(r["exit_status"] == 0 for r in results), results
    lines = run_sync(raw, devbox.id, f"cat {order}", None)["stdout"].split()
    assert lines == [f"{w}-{i}" for i in range(4) for w in ("start", "end")], lines

    # submitted concurrently: never interleaved
    run_sync(raw, devbox.id, f"rm -f {order}", None)
    errors: List[str] = []

    def submit(i: int) -> None:
        try:
            body = {"command": step.replace("$N", str(i)), "shell_name": "ser"}
            r = raw.post(f"/v1/devboxes/{devbox.id}/execute_sync", json=body, timeout=60)
            if r.status_code != 200 or r.json()["exit_status"] != 0:
                errors.append(describe(r))
        except Exception as e:  # pragma: no cover - failure path
            errors.append(repr(e))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - t0
    assert not errors, errors
    lines = run_sync(raw, devbox.id, f"cat {order}", None)["stdout"].split()
    assert len(lines) == 8, lines
    for k in range(0, 8, 2):
        assert lines[k].startswith("start-") and lines[k + 1] == "end-" + lines[k][len("start-") :], lines
    assert elapsed >= 4 * 0.4, f"4 serialized commands of 0.4 s finished in {elapsed:.2f}s"


def test_a_busy_shell_does_not_block_other_shells(devbox, raw):
    busy = _async(raw, devbox.id, "sleep 4; echo slept", "busy")
    queued = _async(raw, devbox.id, "echo after-busy", "busy")
    t0 = time.monotonic()
    assert run_sync(raw, devbox.id, "echo other", "other")["stdout"] == "other\n"
    assert run_sync(raw, devbox.id, "echo plain", None)["stdout"] == "plain\n"
    assert time.monotonic() - t0 < 3, "another shell waited for the busy one"
    r = raw.get(f"/v1/devboxes/{devbox.id}/executions/{queued['execution_id']}")
    assert r.json()["status"] == "queued", "the second command of a busy shell should wait its turn"
    assert _wait(raw, devbox.id, busy["execution_id"])["stdout"] == "slept\n"
    assert _wait(raw, devbox.id, queued["execution_id"])["stdout"] == "after-busy\n"


def test_exit_code_of_a_shell_command_and_state_after_it(devbox, raw):
    run_sync(raw, devbox.id, "cd /tmp && export KEEP=kept", "ex")
    v = run_sync(raw, devbox.id, "echo bye; echo oops >&2; exit 3", "ex")
    assert _out(v) == (3, "bye\n", "oops\n")
    v = run_async(raw, devbox.id, "false", "ex")
    assert v["exit_status"] == 1
    assert run_sync(raw, devbox.id, 'pwd; echo "$KEEP"', "ex")["stdout"] == "/tmp\nkept\n"


def test_a_killed_shell_command_leaves_the_shell_usable(devbox, raw):
    run_sync(raw, devbox.id, "cd /var && export K=1", "k")
    eid = _async(raw, devbox.id, "sleep 100", "k")["execution_id"]
    nxt = _async(raw, devbox.id, 'pwd; echo "$K"', "k")["execution_id"]
    time.sleep(0.5)
    r = raw.post(f"/v1/devboxes/{devbox.id}/executions/{eid}/kill", json={"kill_process_group": True})
    assert r.status_code == 200, describe(r)
    assert r.json()["status"] == "completed"
    v = _wait(raw, devbox.id, nxt)
    assert _out(v) == (0, "/var\n1\n", "")


def test_execution_views_carry_shell_name(devbox, raw):
    v = _async(raw, devbox.id, "echo hi", "named")
    assert v["shell_name"] == "named"
    eid = v["execution_id"]
    assert _wait(raw, devbox.id, eid)["shell_name"] == "named"
    r = raw.get(f"/v1/devboxes/{devbox.id}/executions/{eid}")
    assert r.json()["shell_name"] == "named"
    assert run_sync(raw, devbox.id, "true", "named")["shell_name"] == "named"
    assert run_execute(raw, devbox.id, "true", "named")["shell_name"] == "named"

    # plain executions have none
    plain = run_async(raw, devbox.id, "true", None)
    assert plain.get("shell_name") is None
    assert run_sync(raw, devbox.id, "true", None).get("shell_name") is None


@pytest.mark.deadline(600)
def test_python_sdk_2_named_shells(devbox, sdk2_python, base_url, key_a):
    out, _ = run_json_script(
        [str(sdk2_python), str(SCRIPTS_DIR / "sdk2_named_shell.py")],
        env={"RUNLOOP_BASE_URL": base_url, "RUNLOOP_API_KEY": key_a, "E2E_DEVBOX_ID": devbox.id},
        timeout=180,
    )

    def o(key: str) -> tuple:
        return (out[key]["exit_code"], out[key]["stdout"], out[key]["stderr"])

    assert out["sdk_version"] == "2.0.0"
    assert o("setup") == (0, "", "")
    assert o("s1_state") == (0, "/tmp\nbar\n", "")
    assert o("s2_state") == (0, f"{HOME}\nunset\n", "")
    assert o("plain_state") == (0, f"{HOME}\nunset\n", "")
    assert o("exit3") == (3, "leaving\n", "")
    assert o("after_exit") == (0, "/tmp\nbar\n", "")
    assert all(s in ("queued", "running", "completed") for s in out["queued_statuses"]), out["queued_statuses"]
    assert [r["exit_code"] for r in out["async_results"]] == [0, 0, 0]
    assert out["order"]["stdout"].split() == [f"{w}-{i}" for i in range(3) for w in ("start", "end")]
    assert out["callbacks"]["result"]["exit_code"] == 0
    assert out["callbacks"]["result"]["stdout"] == "bar-1\nbar-2\nbar-3\n"
    assert out["callbacks"]["seen"] == "bar-1\nbar-2\nbar-3\n"
    assert out["view_shell_name"] == "sdk2-s1"
    assert out["plain_view_shell_name"] is None
    s2_logs = out["s2_logs"]
    assert s2_logs, "logs(shell_name=...) returned nothing"
    assert all(e["shell_name"] == "sdk2-s2" for e in s2_logs), s2_logs
    assert {e["cmd_id"] for e in s2_logs} == {out["s2_state"]["execution_id"]}


def test_a_shell_queue_survives_a_server_crash():
    """Commands waiting in a named shell when the server is SIGKILLed still run, in order,
    after the restart, and the shell's state carries on."""
    import requests

    import _server

    ps = _server.PrivateServer()
    try:
        ps.start()
        raw = requests.Session()
        raw.headers["Authorization"] = f"Bearer {ps.key}"
        base = ps.base_url
        r = raw.post(f"{base}/v1/devboxes/create_and_await_running", json={})
        assert r.status_code == 200 and r.json()["status"] == "running", describe(r)
        box = r.json()["id"]

        def submit(cmd: str) -> str:
            r = raw.post(f"{base}/v1/devboxes/{box}/execute_async", json={"command": cmd, "shell_name": "q"})
            assert r.status_code == 200, describe(r)
            return r.json()["execution_id"]

        eids = [
            submit("cd /tmp && export MARK=kept && sleep 2 && echo a >> /tmp/q-order"),
            submit("echo b-$MARK >> /tmp/q-order"),
            submit("echo c-$(pwd) >> /tmp/q-order"),
        ]
        time.sleep(0.5)
        ps.crash()
        ps.start()
        for eid in eids:
            r = raw.post(
                f"{base}/v1/devboxes/{box}/executions/{eid}/wait_for_status",
                json={"statuses": ["completed"], "timeout_seconds": 25},
                timeout=40,
            )
            assert r.status_code == 200 and r.json()["exit_status"] == 0, describe(r)
        r = raw.post(f"{base}/v1/devboxes/{box}/execute_sync", json={"command": "cat /tmp/q-order"})
        assert r.json()["stdout"] == "a\nb-kept\nc-/tmp\n", r.json()
    finally:
        ps.stop()
