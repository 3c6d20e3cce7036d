"""Interactive terminals: the Runloop PTY protocol (create_pty_tunnel, GET /pty/{session},
WebSocket attach, control) and the `devboxd shell` / `devboxd exec` client in a real terminal
(tmux)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Optional, Tuple

import pytest
import websocket

from _helpers import assert_json_error, describe, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
READ_TIMEOUT = 20.0


def _tunnel(raw, box_id: str) -> Tuple[str, str]:
    r = raw.post(f"/v1/devboxes/{box_id}/create_pty_tunnel")
    assert r.status_code == 200, describe(r)
    v = r.json()
    assert re.fullmatch(r"[a-z0-9]+", v["tunnel_key"]), v
    assert v["auth_token"], v
    return v["tunnel_key"], v["auth_token"]


def _ws_url(base_url: str, path: str) -> str:
    return "ws" + base_url[len("http") :] + path


class Term:
    """One WebSocket attachment: raw terminal bytes both ways."""

    def __init__(self, url: str, token: Optional[str] = None, **options) -> None:
        header = [f"Authorization: Bearer {token}"] if token else []
        self.ws = websocket.create_connection(url, header=header, timeout=READ_TIMEOUT, **options)
        self.out = ""

    def send(self, text: str) -> None:
        self.ws.send_binary(text.encode())

    def read_until(self, needle: str, timeout: float = READ_TIMEOUT) -> str:
        """Read until `needle` appears in the output of this attachment; return the output."""
        deadline = time.monotonic() + timeout
        while needle not in self.out:
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} did not appear; output so far: {self.out[-2000:]!r}")
            opcode, data = self.ws.recv_data()
            assert opcode != websocket.ABNF.OPCODE_CLOSE, f"closed while waiting for {needle!r}: {data!r}"
            self.out += data.decode("utf-8", "replace")
        return self.out

    def read_close(self, timeout: float = READ_TIMEOUT) -> Tuple[int, str]:
        """Read (discarding output) until the server's close frame; return (code, reason)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            opcode, data = self.ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 0
                return code, data[2:].decode()
            if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                self.out += data.decode("utf-8", "replace")
        raise AssertionError(f"no close frame; output so far: {self.out[-2000:]!r}")

    def close(self) -> None:
        self.ws.close()


def _attach_status(url: str, token: Optional[str] = None, **options) -> int:
    """The status of a refused WebSocket upgrade."""
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        Term(url, token, **options).close()
    body = e.value.resp_body or b""
    assert json.loads(body)["error"]["message"], body
    return e.value.status_code


@pytest.mark.deadline(240)
def test_pty_session_detach_reattach_resize_signal_close(devbox, raw, make_raw, base_url):
    key, token = _tunnel(raw, devbox.id)
    assert _tunnel(raw, devbox.id) == (key, token), "one tunnel per devbox"
    pty = make_raw(token)

    r = pty.get("/pty/e2e-main", params={"cols": 100, "rows": 30})
    assert r.status_code == 200, describe(r)
    v = r.json()
    assert v["session_name"] == "e2e-main"
    assert (v["created"], v["attached"], v["status"]) == (True, False, "running")
    assert (v["cols"], v["rows"]) == (100, 30)
    assert v["idle_ttl_seconds"] > 0 and v["protocol_version"]
    assert v["connect_url"].startswith("/pty/e2e-main/attach")

    t = Term(_ws_url(base_url, v["connect_url"]), token)
    t.read_until("$ ")
    t.send("echo pty-$((40+2))\r")
    t.read_until("pty-42")

    # One client at a time: a second attach is refused at the upgrade.
    assert _attach_status(_ws_url(base_url, v["connect_url"]), token) == 409
    v = pty.get("/pty/e2e-main").json()
    assert (v["created"], v["attached"]) == (False, True)

    # Dropping the connection detaches; the session lives on with its screen.
    t.close()
    wait_until(lambda: not pty.get("/pty/e2e-main").json()["attached"], timeout=10, what="detach")
    t = Term(_ws_url(base_url, f"/pty/e2e-main/attach?cols=100&rows=30&token={token}"))
    t.read_until("pty-42")

    r = pty.post("/pty/e2e-main/control", json={"action": "resize", "cols": 120, "rows": 40})
    assert r.status_code == 200, describe(r)
    assert r.json() == {"session_name": "e2e-main", "status": "running"}
    t.send("stty size\r")
    t.read_until("40 120")

    # A signal goes to the foreground job, as ^C would.
    t.send("sleep 300\r")
    t.read_until("sleep 300")
    time.sleep(0.5)
    r = pty.post("/pty/e2e-main/control", json={"action": "signal", "signal": "SIGINT"})
    assert r.status_code == 200, describe(r)
    t.send("echo after-$((1+1))\r")
    t.read_until("after-2")

    # The Runloop tunnel origin: Host 13-{key}.tunnel.<domain> and its own auth header.
    anon = make_raw(None)
    host = f"13-{key}.tunnel.localhost"
    r = anon.get("/pty/e2e-main", headers={"Host": host, "X-Runloop-Tunnel-Authorization": f"Bearer {token}"})
    assert r.status_code == 200, describe(r)
    assert r.json()["attached"] is True
    assert_json_error(anon.get("/pty/e2e-main", headers={"Host": host, "Authorization": "Bearer pty_nope"}), 401)

    # Close hangs up the shell; the attached client sees the end, and the name is free again.
    r = pty.post("/pty/e2e-main/control", json={"action": "close"})
    assert r.status_code == 200, describe(r)
    assert r.json() == {"session_name": "e2e-main", "status": "closed"}
    code, reason = t.read_close()
    assert code == 1000, (code, reason)
    assert json.loads(reason)["status"] == "exited"
    assert pty.get("/pty/e2e-main").json()["created"] is True
    pty.post("/pty/e2e-main/control", json={"action": "close"})


@pytest.mark.deadline(120)
def test_pty_exit_code_and_command(devbox, raw, make_raw, base_url):
    _, token = _tunnel(raw, devbox.id)
    pty = make_raw(token)

    # As rl-cli does it: the token as WebSocket subprotocol, keystrokes as text frames.
    v = pty.get("/pty/e2e-exit").json()
    t = Term(_ws_url(base_url, v["connect_url"]), subprotocols=[token])
    assert t.ws.getsubprotocol() == token
    t.read_until("$ ")
    t.ws.send("exit 7\r")
    code, reason = t.read_close()
    assert (code, json.loads(reason)) == (1000, {"status": "exited", "exit_code": 7})

    # devboxd extension: a command instead of a login shell. Its output and exit wait for the
    # first client even if it finished before the client came.
    v = pty.get("/pty/e2e-cmd", params={"command": "echo from-cmd $((2*3)); exit 5"}).json()
    assert v["created"] is True
    wait_until(lambda: pty.get("/pty/e2e-cmd").json()["status"] == "exited", timeout=20, what="command exit")
    t = Term(_ws_url(base_url, v["connect_url"]), token)
    code, reason = t.read_close()
    assert "from-cmd 6" in t.out
    assert (code, json.loads(reason)["exit_code"]) == (1000, 5)
    assert pty.get("/pty/e2e-cmd", params={"command": "true"}).json()["created"] is True


@pytest.mark.deadline(240)
def test_pty_auth_and_tenant_isolation(devbox, box_factory, sdk_b, raw, raw_b, make_raw, base_url):
    key, token = _tunnel(raw, devbox.id)
    anon = make_raw(None)
    assert_json_error(anon.get("/pty/x"), 401)
    assert_json_error(make_raw("pty_bogus").get("/pty/x"), 401)
    assert_json_error(raw.get("/pty/x"), 401)  # an API key is not a tunnel token
    assert_json_error(make_raw("pty_bogus").post("/pty/x/control", json={"action": "close"}), 401)
    assert _attach_status(_ws_url(base_url, "/pty/x/attach"), "pty_bogus") == 401
    assert_json_error(anon.post(f"/v1/devboxes/{devbox.id}/create_pty_tunnel"), 401)
    assert_json_error(raw.post("/v1/devboxes/dbx_nope/create_pty_tunnel"), 404)

    # Another tenant can neither open a tunnel to this box nor use its token on it.
    assert_json_error(raw_b.post(f"/v1/devboxes/{devbox.id}/create_pty_tunnel"), 404)
    box_b = box_factory.create(sdk=sdk_b)
    key_b, token_b = _tunnel(raw_b, box_b.id)
    assert key_b != key and token_b != token
    foreign = {"Host": f"13-{key}.tunnel.example.com", "Authorization": f"Bearer {token_b}"}
    assert_json_error(anon.get("/pty/shared", headers=foreign), 401)
    # A token opens its own box: the same session name is a different session there.
    pty_a, pty_b = make_raw(token), make_raw(token_b)
    assert pty_a.get("/pty/shared").json()["created"] is True
    v = pty_b.get("/pty/shared").json()
    assert v["created"] is True
    t = Term(_ws_url(base_url, v["connect_url"]), token_b)
    t.read_until("$ ")
    t.send("hostname\r")
    t.read_until(box_b.id)
    t.close()

    # Every bad input is a JSON 4xx.
    for name in ["a%20b", "a.b", "x" * 257]:
        assert_json_error(pty_a.get(f"/pty/{name}"), 400)
    for params in [{"cols": "0"}, {"cols": "abc"}, {"rows": "501"}, {"cols": "-1"}]:
        assert_json_error(pty_a.get("/pty/shared", params=params), 400)
    for body in [
        {"action": "resize", "cols": 0, "rows": 5},
        {"action": "resize", "cols": 100},
        {"action": "resize", "cols": 100000, "rows": 5},
        {"action": "resize", "cols": "wide", "rows": 5},
        {"action": "signal", "signal": "SIGFOO"},
        {"action": "signal"},
        {"action": "dance"},
        {},
    ]:
        assert_json_error(pty_a.post("/pty/shared/control", json=body), 400)
    assert_json_error(pty_a.post("/pty/shared/control", data="not json"), 400)
    assert_json_error(pty_a.post("/pty/no-such-session/control", json={"action": "close"}), 404)
    assert _attach_status(_ws_url(base_url, "/pty/no-such-session/attach"), token) == 404
    assert_json_error(pty_a.get("/pty/shared/attach"), 400)  # not a WebSocket upgrade

    for p in (pty_a, pty_b):
        assert p.post("/pty/shared/control", json={"action": "close"}).status_code == 200


# ---------------------------------------------------------------- the CLI in a real terminal


def _devboxd_bin() -> Path:
    path = Path(os.environ.get("DEVBOXD_BIN", REPO_ROOT / "target" / "release" / "devboxd"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"devboxd binary not found: {path} (set DEVBOXD_BIN)", pytrace=False)
    return path


class Tmux:
    """A private tmux server (its own socket) running one window of 100x30."""

    def __init__(self, tmp: Path) -> None:
        if shutil.which("tmux") is None:
            pytest.fail("tmux is needed for the terminal tests: apt-get install tmux", pytrace=False)
        self.sock = "devboxd-e2e-" + secrets.token_hex(4)
        self.tmp = tmp

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], check=True, capture_output=True, text=True).stdout

    def start(self, command: str) -> None:
        self.tmux("new-session", "-d", "-s", "main", "-x", "100", "-y", "30", command)

    def keys(self, text: str, enter: bool = True) -> None:
        self.tmux("send-keys", "-t", "main", "-l", text)
        if enter:
            self.tmux("send-keys", "-t", "main", "Enter")

    def key(self, *names: str) -> None:
        self.tmux("send-keys", "-t", "main", *names)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "main")

    def wait(self, pred, what: str, timeout: float = READ_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            s = self.screen()
            if pred(s):
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; screen:\n{s}")
            time.sleep(0.1)

    def wait_text(self, text: str, timeout: float = READ_TIMEOUT) -> str:
        return self.wait(lambda s: text in s, repr(text), timeout)

    def wait_prompt(self) -> str:
        def at_prompt(s: str) -> bool:
            lines = [l for l in s.splitlines() if l.strip()]
            return bool(lines) and lines[-1].rstrip().endswith("$")

        return self.wait(at_prompt, "the shell prompt")

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True)


def _pid_with_arg(arg: str) -> int:
    """The one process whose command line has `arg` (a unique session name)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and arg.encode() in (d / "cmdline").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:
            pass
    assert len(pids) == 1, pids
    return pids[0]


@pytest.fixture
def tmux(tmp_path):
    t = Tmux(tmp_path)
    try:
        yield t
    finally:
        t.kill()


@pytest.mark.deadline(240)
def test_cli_shell_in_tmux(devbox, base_url, key_a, tmux, tmp_path):
    status = tmp_path / "status"
    script = tmp_path / "shell.sh"
    session = "e2e-cli-" + secrets.token_hex(3)
    script.write_text(
        f'RUNLOOP_BASE_URL={base_url} RUNLOOP_API_KEY={key_a} "{_devboxd_bin()}" shell {devbox.id} --session {session}\n'
        f'echo "$?" > {status}\n'
        "sleep 600\n"
    )
    tmux.start(f"sh {script}")
    tmux.wait_prompt()

    # A full-screen program: draw, type, quit; the shell's screen comes back.
    tmux.keys("vim /tmp/e2e-vi.txt")
    tmux.wait(lambda s: s.splitlines().count("~") >= 10, "vim's empty-buffer tildes")
    tmux.key("i")
    tmux.keys("hello from vim", enter=False)
    tmux.key("Escape")
    tmux.wait_text("hello from vim")
    tmux.keys(":q!")
    s = tmux.wait_prompt()
    assert "hello from vim" not in s, s

    tmux.keys("top")
    tmux.wait_text("load average")
    tmux.key("q")
    tmux.wait_prompt()

    # Resizing the terminal resizes the remote one (SIGWINCH -> resize control).
    tmux.tmux("resize-window", "-t", "main", "-x", "90", "-y", "25")
    tmux.keys("stty size")
    tmux.wait_text("25 90")

    # The client hangs up: it exits (128 + SIGHUP) and restores the terminal; the session
    # stays, and a new client on the same session gets the same screen back.
    tmux.keys("echo keep-$((6*7))")
    tmux.wait_text("keep-42")
    os.kill(_pid_with_arg(session), signal.SIGHUP)
    wait_until(status.exists, timeout=10, what="the CLI to exit on hangup")
    assert status.read_text().strip() == "129"
    status.unlink()
    tmux.tmux("respawn-pane", "-k", "-t", "main", f"sh {script}")
    tmux.wait_text("keep-42")

    tmux.keys("exit 3")
    wait_until(status.exists, timeout=20, what="the CLI to exit")
    assert status.read_text().strip() == "3", tmux.screen()


@pytest.mark.deadline(120)
def test_cli_exec_exit_codes(devbox, base_url, key_a):
    env = dict(os.environ, RUNLOOP_BASE_URL=base_url, RUNLOOP_API_KEY=key_a)
    run = lambda *args, **kw: subprocess.run(  # noqa: E731
        [str(_devboxd_bin()), "exec", *args], env=env, capture_output=True, text=True, timeout=60, **kw
    )
    # Not a terminal: the execution API, stdout and stderr apart.
    r = run(devbox.id, "--", "echo out; echo err >&2; exit 7", stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    r = run(devbox.id, "--", "seq", "1", "3")
    assert (r.returncode, r.stdout) == (0, "1\n2\n3\n")
    # Forced terminal: a PTY session running the command.
    r = run("-t", devbox.id, "--", "tty; exit 4", input="")
    assert r.returncode == 4, r
    assert r.stdout.startswith("/dev/pts/"), r
    # Client failures exit 255 with a message.
    r = run("dbx_nope", "--", "true")
    assert r.returncode == 255 and "not found" in r.stderr, r
