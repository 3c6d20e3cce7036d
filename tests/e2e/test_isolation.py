"""Isolation, checked from inside a box with cmd.exec: a box must not see or harm the host.

These tests start listeners and create marker files on the host, and push boxes into their
memory and process limits. The slow ones are marked `slow`; all are marked `isolation`.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from _helpers import wait_until

pytestmark = pytest.mark.isolation

HERE = Path(__file__).resolve()


def _kv(stdout: str) -> dict:
    out = {}
    for line in stdout.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _exec(box, cmd: str):
    r = box.cmd.exec(cmd)
    return r, r.stdout(), r.stderr()


def test_isolation_hostname_is_devbox_id(devbox):
    r, out, err = _exec(devbox, "uname -n; cat /proc/sys/kernel/hostname")
    assert r.exit_code == 0, err
    assert out == f"{devbox.id}\n{devbox.id}\n"
    assert socket.gethostname() != devbox.id


def test_isolation_pid_namespace_hides_host_processes(devbox):
    me = os.getpid()
    assert "pytest" in Path(f"/proc/{me}/cmdline").read_bytes().decode(errors="replace")
    script = f"""
n=0; for p in /proc/[0-9]*; do n=$((n+1)); done; echo "count=$n"
if [ -r /proc/{me}/cmdline ]; then echo "me=$(tr '\\0' ' ' < /proc/{me}/cmdline)"; else echo "me=<none>"; fi
echo "host_runner_hits=$(cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n' | grep -c '[p]ytest')"
echo "server_hits=$(cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n' | grep -c '^[-]-api-key$')"
if command -v ps >/dev/null; then echo "ps_lines=$(ps -e | wc -l)"; fi
"""
    r, out, err = _exec(devbox, script)
    assert r.exit_code == 0, (out, err)
    kv = _kv(out)
    count = int(kv["count"])
    assert 1 <= count <= 40, f"box sees {count} processes; expected only its own few"
    assert "pytest" not in kv["me"], f"host pytest process visible inside the box: {kv['me']}"
    assert kv["host_runner_hits"] == "0", "a host pytest process is visible inside the box"
    assert kv["server_hits"] == "0", "the devboxd server process is visible inside the box"
    if "ps_lines" in kv:
        assert int(kv["ps_lines"]) <= 41, out


def test_isolation_host_files_not_visible(devbox, server):
    token = secrets.token_hex(8)
    marker = Path(f"/tmp/devboxd-e2e-marker-{token}")
    marker.write_text("host secret\n")
    paths = [str(marker), str(HERE)]
    if server.data_dir is not None:
        paths.append(str(server.data_dir))
    if server.log_path is not None:
        paths.append(str(server.log_path))
    try:
        script = (
            f"for p in {' '.join(paths)}; do "
            '  if [ -e "$p" ] || sudo -n test -e "$p"; then echo "VISIBLE $p"; fi; '
            "done; "
            "sudo -n find / \\( -path /proc -o -path /sys \\) -prune -o "
            f"-name 'devboxd-e2e-marker-{token}' -print 2>/dev/null; "
            "echo checked"
        )
        r, out, err = _exec(devbox, script)
        assert out.endswith("checked\n"), (out, err)
        assert out == "checked\n", f"host paths visible inside the box:\n{out}"
        # positive control: the box has its own, writable /tmp
        r, out, _ = _exec(devbox, f"echo inside > /tmp/devboxd-e2e-marker-{token} && cat /tmp/devboxd-e2e-marker-{token}")
        assert out == "inside\n"
        assert marker.read_text() == "host secret\n", "writing the box's /tmp changed the host's /tmp"
    finally:
        marker.unlink(missing_ok=True)


def test_isolation_host_loopback_not_reachable(devbox):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def accept_loop():
        while not stop.is_set():
            try:
                conn, addr = listener.accept()
            except (socket.timeout, OSError):
                continue
            accepted.append(addr)
            try:
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nhost")
            finally:
                conn.close()

    t = threading.Thread(target=accept_loop, daemon=True)
    t.start()
    try:
        # sanity: the listener is reachable from the host itself
        with socket.create_connection(("127.0.0.1", port), timeout=3):
            pass
        wait_until(lambda: len(accepted) == 1, timeout=5, what="host self-connect")
        accepted.clear()

        script = f"""
if timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' 2>/dev/null; then echo tcp=REACHABLE; else echo tcp=unreachable; fi
if command -v curl >/dev/null; then
  if curl -sS -m 3 http://127.0.0.1:{port}/ >/dev/null 2>&1; then echo curl=REACHABLE; else echo curl=unreachable; fi
fi
python3 - <<'EOF'
import socket
s = socket.socket()
try:
    s.bind(("127.0.0.1", {port}))
    s.listen(1)
    c = socket.create_connection(("127.0.0.1", {port}), timeout=3)
    a, _ = s.accept()
    print("box_loopback=ok")
except OSError as e:
    print("box_loopback=" + repr(e))
EOF
"""
        r, out, err = _exec(devbox, script)
        kv = _kv(out)
        assert kv.get("tcp") == "unreachable", f"host 127.0.0.1:{port} reachable from the box: {out} {err}"
        assert kv.get("curl", "unreachable") == "unreachable", out
        assert accepted == [], f"host listener accepted connections from the box: {accepted}"
        # positive control: the box has its own working loopback on which that port is free
        assert kv.get("box_loopback") == "ok", f"box loopback check failed: {out} {err}"
    finally:
        stop.set()
        t.join(timeout=2)
        listener.close()


def test_isolation_proc_sys_is_read_only(devbox):
    core_pattern = Path("/proc/sys/kernel/core_pattern")
    before = core_pattern.read_text()
    script = """
sudo -n true; echo "sudo=$?"
sh -c 'echo x > /proc/sys/kernel/core_pattern' 2>/dev/null; echo "user_write=$?"
sudo -n sh -c 'echo x > /proc/sys/kernel/core_pattern' 2>/dev/null; echo "root_write=$?"
sudo -n sh -c 'echo 1 > /proc/sys/vm/drop_caches' 2>/dev/null; echo "drop_caches=$?"
"""
    r, out, err = _exec(devbox, script)
    kv = _kv(out)
    assert kv["sudo"] == "0", f"sudo must work for this test to mean anything: {out} {err}"
    assert kv["user_write"] != "0", out
    assert kv["root_write"] != "0", "root in the box could write /proc/sys/kernel/core_pattern"
    assert kv["drop_caches"] != "0", "root in the box could write /proc/sys/vm/drop_caches"
    assert core_pattern.read_text() == before, "host core_pattern changed!"


def test_isolation_mount_is_denied(devbox):
    script = """
sudo -n true; echo "sudo=$?"
command -v mount >/dev/null; echo "has_mount=$?"
sudo -n mount -t tmpfs x /mnt 2>/dev/null; echo "mount=$?"
echo "mounted=$(grep -c ' /mnt ' /proc/mounts)"
sudo -n umount /mnt 2>/dev/null || true
"""
    r, out, err = _exec(devbox, script)
    kv = _kv(out)
    assert kv["sudo"] == "0", f"sudo must work for this test to mean anything: {out} {err}"
    assert kv["has_mount"] == "0", "the image has no mount binary; cannot check"
    assert kv["mount"] != "0", "root in the box could mount a tmpfs"
    assert kv["mounted"] == "0", out


HOG = """python3 - <<'EOF'
chunks = []
for i in range(30):
    chunks.append(b"\\x01" * (100 << 20))  # 100 MiB, really touched
    print(i + 1, flush=True)
print("allocated-all", flush=True)
EOF"""


@pytest.mark.slow
@pytest.mark.deadline(480)
def test_isolation_memory_limit_oom_kills_hog_and_box_survives(box_factory, raw):
    box = box_factory.create(
        launch_parameters={"resource_size_request": "CUSTOM_SIZE", "custom_cpu_cores": 1, "custom_gb_memory": 1}
    )
    lp = box.get_info().launch_parameters
    assert (lp.resource_size_request, lp.custom_gb_memory) == ("CUSTOM_SIZE", 1)

    r, out, err = _exec(box, HOG)
    assert "allocated-all" not in out, "3 GiB allocated in a 1 GiB box: no memory limit"
    assert r.exit_code == 137, f"expected the hog to be OOM-killed (137), got {r.exit_code}; stderr: {err[-500:]}"
    printed = [int(x) for x in out.split() if x.isdigit()]
    reached = max(printed, default=0)
    assert reached <= 14, f"hog reached {reached * 100} MiB in a 1 GiB box"

    # the box itself survives and keeps working
    assert box.get_info().status == "running"
    r, out, _ = _exec(box, "echo ok")
    assert (r.exit_code, out) == (0, "ok\n")
    assert raw.get("/healthz").status_code == 200


FORKER = """python3 - <<'EOF'
import json, subprocess
procs, err = [], None
try:
    for _ in range(5000):
        procs.append(subprocess.Popen(["sleep", "100"]))
except OSError as e:
    err = "%s errno=%s %s" % (type(e).__name__, e.errno, e.strerror)
started = len(procs)
for p in procs:
    try:
        p.kill()
    except Exception:
        pass
for p in procs:
    try:
        p.wait(timeout=10)
    except Exception:
        pass
print("RESULT " + json.dumps({"started": started, "error": err}), flush=True)
EOF"""


@pytest.mark.slow
@pytest.mark.deadline(480)
def test_isolation_pids_limit_stops_fork_bomb_and_host_is_fine(devbox, raw):
    r, out, err = _exec(devbox, FORKER)
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert lines, f"forker printed no result (exit {r.exit_code}): {out[-500:]} {err[-500:]}"
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["error"] is not None, f"started {res['started']} processes in the box without hitting a limit"
    assert "Resource temporarily unavailable" in res["error"] or "errno=11" in res["error"], res
    assert res["started"] < 5000

    # the host can still spawn processes and the server still answers
    for _ in range(5):
        subprocess.run(["true"], check=True, timeout=10)
    assert raw.get("/healthz").status_code == 200

    # once the children are gone the box is usable again
    def box_ok():
        try:
            rr = devbox.cmd.exec("echo ok; cat /proc/[0-9]*/comm 2>/dev/null | grep -cx sleep || true")
        except Exception:
            return None
        return rr.stdout() == "ok\n0\n"

    wait_until(box_ok, timeout=60, interval=2, what="box to run `echo ok` with no sleeps left")
