"""Command execution through the official SDK (cmd.exec / exec_async) and the low-level client."""

from __future__ import annotations

import threading
import time

from uuid_utils import uuid7

from _helpers import describe, wait_until


def _lines(a: int, b: int) -> str:
    return "".join(f"{i}\n" for i in range(a, b + 1))


def test_exec_stdout_stderr_and_exit_code(devbox):
    r = devbox.cmd.exec("echo out; echo err >&2")
    assert r.exit_code == 0
    assert r.success
    assert r.stdout() == "out\n"
    assert r.stderr() == "err\n"
    assert r.result.status == "completed"
    assert r.result.devbox_id == devbox.id
    assert r.execution_id

    r = devbox.cmd.exec("printf 'a\\n'; printf 'b\\n' >&2; printf 'c\\n'")
    assert (r.stdout(), r.stderr()) == ("a\nc\n", "b\n")

    r = devbox.cmd.exec("echo before; echo oops >&2; exit 3")
    assert r.exit_code == 3
    assert r.failed
    assert r.stdout() == "before\n"
    assert r.stderr() == "oops\n"

    r = devbox.cmd.exec("false")
    assert r.exit_code == 1

    r = devbox.cmd.exec("true")
    assert (r.exit_code, r.stdout(), r.stderr()) == (0, "", "")


def test_exec_runs_in_login_bash_as_user_in_home(devbox):
    def out(cmd: str) -> str:
        r = devbox.cmd.exec(cmd)
        assert r.exit_code == 0, (cmd, r.exit_code, r.stdout(), r.stderr())
        return r.stdout()

    assert out("echo a b c | tr ' ' '\\n' | wc -l").strip() == "3"
    assert out('echo "$HOME"') == "/home/user\n"
    assert out("whoami") == "user\n"
    assert out("pwd") == "/home/user\n"
    assert out("id -u").strip() != "0"
    assert out("shopt -q login_shell && echo login || echo not-login") == "login\n"
    assert out('echo "$BASH_VERSION" | cut -c1').strip().isdigit()
    assert out("for i in 1 2 3; do echo $i; done") == "1\n2\n3\n"
    assert out("x=$((6 * 7)); echo \"$x\" 'single quoted $x'") == "42 single quoted $x\n"
    assert out("cat <<'EOF'\nline one\nline two\nEOF") == "line one\nline two\n"
    # every exec is a fresh shell: cwd and exported variables do not leak between commands
    out("cd /tmp && export E2E_LEAK=1")
    assert out('pwd; echo "${E2E_LEAK:-unset}"') == "/home/user\nunset\n"


def test_environment_variables_and_launch_commands(box_factory):
    env = {"E2E_GREETING": "hello world", "E2E_QUOTED": "it's \"quoted\" $NOT_EXPANDED"}
    launch_commands = [
        "echo launched > /tmp/e2e_launch_marker",
        "echo second >> /tmp/e2e_launch_marker",
    ]
    box = box_factory.create(environment_variables=env, launch_parameters={"launch_commands": launch_commands})

    # launch commands ran (in order) before the box was reported running
    r = box.cmd.exec("cat /tmp/e2e_launch_marker")
    assert r.exit_code == 0, r.stderr()
    assert r.stdout() == "launched\nsecond\n"

    r = box.cmd.exec('printf "%s|%s" "$E2E_GREETING" "$E2E_QUOTED"')
    assert r.stdout() == "hello world|it's \"quoted\" $NOT_EXPANDED"

    info = box.get_info()
    assert info.launch_parameters.launch_commands == launch_commands


def test_sudo_is_passwordless(devbox):
    r = devbox.cmd.exec("sudo -n true")
    assert r.exit_code == 0, r.stderr()
    r = devbox.cmd.exec("sudo -n id -u; sudo -n whoami")
    assert r.exit_code == 0, r.stderr()
    assert r.stdout() == "0\nroot\n"


def test_exec_streaming_callbacks_receive_all_output(devbox):
    got_out: list = []
    got_err: list = []
    got_all: list = []
    lock = threading.Lock()

    def collect(buf):
        def cb(text: str) -> None:
            with lock:
                buf.append(text)

        return cb

    r = devbox.cmd.exec(
        "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.3; done",
        stdout=collect(got_out),
        stderr=collect(got_err),
        output=collect(got_all),
    )
    assert r.exit_code == 0
    assert "".join(got_out) == "out1\nout2\nout3\n"
    assert "".join(got_err) == "err1\nerr2\nerr3\n"
    combined = "".join(got_all)
    assert sorted(combined.splitlines()) == sorted(["out1", "out2", "out3", "err1", "err2", "err3"])


def test_exec_async_kill(devbox):
    ex = devbox.cmd.exec_async("sleep 100")
    state = wait_until(
        lambda: (lambda s: s if s.status == "running" else None)(ex.get_state()),
        timeout=20,
        what="execution to be running",
    )
    assert state.execution_id == ex.execution_id
    assert state.devbox_id == devbox.id
    assert state.exit_status is None

    t0 = time.monotonic()
    ex.kill()
    res = ex.result()  # wait_for_status(completed)
    elapsed = time.monotonic() - t0
    assert elapsed < 10, f"kill took {elapsed:.1f}s to complete the execution"
    assert res.result.status == "completed"
    code = res.exit_code
    assert code is not None and code != 0, code
    assert code == 137 or 128 < code <= 128 + 64, f"killed execution should exit 128+signal, got {code}"

    state = ex.get_state()
    assert state.status == "completed"
    assert state.exit_status == code

    r = devbox.cmd.exec("cat /proc/[0-9]*/comm 2>/dev/null | grep -cx sleep || true")
    assert r.stdout().strip() == "0", "the killed sleep is still running"


def test_exec_async_result(devbox):
    t0 = time.monotonic()
    ex = devbox.cmd.exec_async("sleep 1; echo hi")
    res = ex.result()
    assert time.monotonic() - t0 >= 1.0
    assert res.exit_code == 0
    assert res.stdout() == "hi\n"
    assert res.stderr() == ""


def test_long_output_is_truncated_streamed_and_last_n(devbox, client):
    full_out = _lines(1, 500)
    full_err = _lines(1, 300)
    r = devbox.cmd.exec("seq 1 500; seq 1 300 >&2")
    assert r.exit_code == 0

    # inline output: the last 100 lines, flagged as truncated
    assert r.result.stdout_truncated is True
    assert r.result.stdout == _lines(401, 500)
    assert r.result.stderr_truncated is True
    assert r.result.stderr == _lines(201, 300)

    # the SDK fetches the rest through stream_stdout_updates / stream_stderr_updates
    assert r.stdout() == full_out
    assert r.stderr() == full_err

    v = client.devboxes.executions.retrieve(r.execution_id, devbox_id=devbox.id, last_n="5")
    assert v.status == "completed"
    assert v.stdout == _lines(496, 500)
    assert v.stdout_truncated is True
    assert v.stderr == _lines(296, 300)
    assert v.stderr_truncated is True

    v = client.devboxes.executions.retrieve(r.execution_id, devbox_id=devbox.id, last_n="1000")
    assert v.stdout == full_out
    assert v.stdout_truncated is False

    # SSE: whole stream, then resume from a byte offset
    eid = r.execution_id
    chunks = list(client.devboxes.executions.stream_stdout_updates(eid, devbox_id=devbox.id, timeout=60))
    assert "".join(c.output for c in chunks) == full_out
    offsets = [c.offset for c in chunks if c.offset is not None]
    assert offsets == sorted(offsets)
    tail = client.devboxes.executions.stream_stdout_updates(eid, devbox_id=devbox.id, offset="1000", timeout=60)
    assert "".join(c.output for c in tail) == full_out.encode()[1000:].decode()


def test_long_multibyte_output_survives_chunking(devbox):
    line = "é€日本🚀" * 300
    r = devbox.cmd.exec(f"yes '{line}' | head -n 300")
    assert r.exit_code == 0
    assert r.result.stdout_truncated is True
    out = r.stdout()
    assert "\ufffd" not in out, "a multi-byte character was split and replaced"
    assert out == (line + "\n") * 300


def test_execute_is_idempotent_by_command_id(devbox, client):
    cmd = "echo run >> /tmp/idem.log; wc -l < /tmp/idem.log"
    cid = str(uuid7())
    e1 = client.devboxes.execute(devbox.id, command=cmd, command_id=cid)
    e2 = client.devboxes.execute(devbox.id, command=cmd, command_id=cid)
    assert e1.execution_id == e2.execution_id
    done = client.devboxes.wait_for_command(e1.execution_id, devbox_id=devbox.id, statuses=["completed"])
    assert done.exit_status == 0
    assert done.stdout.strip() == "1"
    assert devbox.cmd.exec("wc -l < /tmp/idem.log").stdout().strip() == "1"

    e3 = client.devboxes.execute(devbox.id, command=cmd, command_id=str(uuid7()))
    assert e3.execution_id != e1.execution_id
    done = client.devboxes.wait_for_command(e3.execution_id, devbox_id=devbox.id, statuses=["completed"])
    assert done.stdout.strip() == "2"


def test_execute_and_await_completion(devbox, client):
    v = client.devboxes.execute_and_await_completion(devbox.id, command="echo fast")
    assert (v.status, v.exit_status, v.stdout, v.stderr) == ("completed", 0, "fast\n", "")
    assert v.devbox_id == devbox.id

    # optimistic_timeout: execute returns the running state instead of holding for the command
    t0 = time.monotonic()
    v = client.devboxes.execute(devbox.id, command="sleep 4; echo late", optimistic_timeout=1)
    assert time.monotonic() - t0 < 3.5
    assert v.status in ("queued", "running"), v.status
    assert v.exit_status is None

    # ...and execute_and_await_completion falls back to the long poll until it is done
    v = client.devboxes.execute_and_await_completion(
        devbox.id, command="sleep 3; echo slow; echo bad >&2; exit 4", optimistic_timeout=1
    )
    assert (v.status, v.exit_status, v.stdout, v.stderr) == ("completed", 4, "slow\n", "bad\n")


def test_execute_async_raw_shape(devbox, raw):
    r = raw.post(f"/v1/devboxes/{devbox.id}/execute_async", json={"command": "echo raw"})
    assert r.status_code == 200, describe(r)
    body = r.json()
    assert body["devbox_id"] == devbox.id
    assert body["execution_id"]
    assert body["status"] in ("queued", "running", "completed")
    eid = body["execution_id"]
    r = raw.post(
        f"/v1/devboxes/{devbox.id}/executions/{eid}/wait_for_status",
        json={"statuses": ["completed"], "timeout_seconds": 20},
    )
    assert r.status_code == 200, describe(r)
    body = r.json()
    assert body["status"] == "completed"
    assert body["exit_status"] == 0
    assert body["stdout"] == "raw\n"
    assert body["stderr"] == ""
    assert body["stdout_truncated"] is False
    assert body["stderr_truncated"] is False
