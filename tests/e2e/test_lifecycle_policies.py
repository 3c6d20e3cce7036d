"""Lifecycle with the official SDK: suspend/resume keeps memory, hibernation keeps the disk,
idle and keep-alive policies, entrypoint, suspend hooks, usage, and restarts that lose nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import requests
from runloop_api_client import RunloopSDK

import _server
from _helpers import describe


def _out(box, cmd: str) -> str:
    r = box.cmd.exec(cmd)
    assert r.exit_code == 0, (cmd, r.stdout(), r.stderr())
    return r.stdout()


def _wait_status(raw, box_id: str, statuses, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = raw.post(f"/v1/devboxes/{box_id}/wait_for_status", json={"statuses": statuses, "timeout_seconds": 5})
        if r.status_code == 200:
            return r.json()
        assert r.status_code == 408, describe(r)
        assert time.monotonic() < deadline, f"{box_id} never reached {statuses}"


def test_suspend_resume_keeps_processes_memory_and_files(raw, box_factory):
    box = box_factory.create()
    box.file.write(file_path="state.txt", contents="kept")
    _out(box, "nohup python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 & echo $! > ~/server.pid; sleep 1")
    pid = _out(box, "cat ~/server.pid").strip()
    # A value that exists only in a process's memory.
    _out(box, "nohup python3 -c 'import time; x=\"secret-\"+str(41+1); time.sleep(3600)' >/dev/null 2>&1 &")
    box.suspend()
    info = box.get_info()
    assert info.status == "suspended" and info.model_extra.get("hibernated") is False
    r = raw.post(f"/v1/devboxes/{box.id}/execute_async", json={"command": "true"})
    assert r.status_code == 409, describe(r)
    box.resume()
    assert box.get_info().status == "running"
    assert _out(box, f"cat ~/state.txt; echo; kill -0 {pid} && echo alive") == "kept\nalive\n"
    assert "Directory listing" in _out(box, "curl -s http://127.0.0.1:8000/")
    assert _out(box, "pgrep -f 'secret-' >/dev/null && echo found") == "found\n"
    trans = [t["status"] for t in raw.get(f"/v1/devboxes/{box.id}").json()["state_transitions"]]
    assert trans[-4:] == ["suspending", "suspended", "resuming", "running"], trans


def test_idle_shutdown_and_idle_suspend(raw, box_factory):
    gone = box_factory.create(launch_parameters={"after_idle": {"idle_time_seconds": 2, "on_idle": "shutdown"}})
    napper = box_factory.create(
        launch_parameters={"lifecycle": {"after_idle": {"idle_time_seconds": 2, "on_idle": "suspend"}}}
    )
    t0 = time.monotonic()
    d = _wait_status(raw, gone.id, ["shutdown"], timeout=20)
    assert d["shutdown_reason"] == "idle", d
    assert time.monotonic() - t0 >= 1.0
    d = _wait_status(raw, napper.id, ["suspended"], timeout=20)
    assert d["status"] == "suspended"


def test_running_execution_is_not_idle(raw, box_factory):
    box = box_factory.create(launch_parameters={"after_idle": {"idle_time_seconds": 2, "on_idle": "shutdown"}})
    r = box.cmd.exec("sleep 5; echo done")
    assert r.stdout() == "done\n"
    assert raw.get(f"/v1/devboxes/{box.id}").json()["status"] == "running"


def test_keep_alive_time_and_keep_alive_extension(raw, box_factory):
    short = box_factory.create(launch_parameters={"keep_alive_time_seconds": 3})
    kept = box_factory.create(launch_parameters={"keep_alive_time_seconds": 4})
    time.sleep(2.5)
    kept.keep_alive()
    d = _wait_status(raw, short.id, ["shutdown"], timeout=15)
    assert d["shutdown_reason"] == "keep_alive_timeout"
    assert raw.get(f"/v1/devboxes/{kept.id}").json()["status"] == "running", "keep_alive did not extend"
    d = _wait_status(raw, kept.id, ["shutdown"], timeout=15)
    assert d["shutdown_reason"] == "keep_alive_timeout"


def test_entrypoint_exit_shuts_the_box_down(raw, sdk, box_factory):
    box = box_factory.create(entrypoint="sleep 2; echo bye > /tmp/bye")
    assert box.get_info().status == "running"
    d = _wait_status(raw, box.id, ["shutdown"], timeout=20)
    assert d["shutdown_reason"] == "entrypoint_exit", d
    logs = raw.get(f"/v1/devboxes/{box.id}/logs").json()["logs"]
    assert any(e["source"] == "entrypoint" for e in logs), logs


def test_suspend_commands_run_and_are_bounded(raw, box_factory):
    box = box_factory.create(
        launch_parameters={"lifecycle": {"lifecycle_hooks": {"suspend_commands": ["echo hooked > ~/hook.txt"]}}}
    )
    box.suspend()
    box.resume()
    assert _out(box, "cat ~/hook.txt") == "hooked\n"
    slow = box_factory.create(
        launch_parameters={
            "lifecycle": {"lifecycle_hooks": {"suspend_commands": ["sleep 60"], "suspend_deadline_ms": 1000}}
        }
    )
    t0 = time.monotonic()
    r = raw.post(f"/v1/devboxes/{slow.id}/suspend")
    assert r.status_code == 200 and r.json()["status"] == "suspending", describe(r)
    _wait_status(raw, slow.id, ["suspended"], timeout=20)
    assert time.monotonic() - t0 < 10, "suspend waited past its deadline"


def test_bad_lifecycle_parameters_are_400(raw):
    for lp in (
        {"after_idle": {"idle_time_seconds": 5, "on_idle": "nap"}},
        {"after_idle": {"idle_time_seconds": 0, "on_idle": "shutdown"}},
        {"keep_alive_time_seconds": 0},
        {"keep_alive_time_seconds": 999999},
        {"lifecycle": {"lifecycle_hooks": {"suspend_deadline_ms": 999999}}},
    ):
        r = raw.post("/v1/devboxes", json={"launch_parameters": lp})
        assert r.status_code == 400, (lp, describe(r))


def test_usage_accounts_cpu_and_time(raw, box_factory):
    box = box_factory.create()
    _out(box, "timeout 3 sh -c 'while :; do :; done' || true")
    time.sleep(1.5)
    u = raw.get(f"/v1/devboxes/{box.id}/usage").json()
    assert u["id"] == box.id and u["status"] == "running"
    assert u["total_elapsed_seconds"] >= 3, u
    assert u["total_active_seconds"] >= 2, u
    assert u["vcpu_seconds"] >= 1, u
    assert u["memory_bytes"] > 0, u


def test_metrics_endpoint(make_raw, box_factory):
    box_factory.create()
    r = make_raw(None).get("/metrics")
    assert r.status_code == 200, describe(r)
    text = r.text
    assert 'devboxd_devboxes{status="running"}' in text
    assert "devboxd_api_request_duration_seconds_bucket" in text
    assert "devboxd_host_memory_available_bytes" in text
    assert "devboxd_executions_total" in text


# ---- private servers: hibernation, restarts --------------------------------------------------


def _start(ps: _server.PrivateServer, *extra: str) -> None:
    """Start a private server with extra `serve` flags."""
    orig = _server.server_command

    def with_extra(port, data_dir, keys):
        return orig(port, data_dir, keys) + list(extra)

    _server.server_command = with_extra
    try:
        ps.start()
    finally:
        _server.server_command = orig


@pytest.fixture
def private():
    servers = []

    def make() -> _server.PrivateServer:
        ps = _server.PrivateServer()
        servers.append(ps)
        return ps

    yield make
    for ps in servers:
        ps.stop()


def _raw(ps) -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {ps.key}"
    return s


def test_hibernate_keeps_the_disk_and_reruns_launch_commands(private):
    ps = private()
    _start(ps, "--hibernate-after", "1")
    sdk = RunloopSDK(base_url=ps.base_url, bearer_token=ps.key)
    box = sdk.devbox.create(launch_parameters={"launch_commands": ["echo boot >> ~/boots.txt"]})
    box.file.write(file_path="disk.txt", contents="on disk")
    _out(box, "nohup sleep 3600 >/dev/null 2>&1 &")
    box.suspend()
    raw = _raw(ps)
    deadline = time.monotonic() + 20
    while not raw.get(f"{ps.base_url}/v1/devboxes/{box.id}").json().get("hibernated"):
        assert time.monotonic() < deadline, "never hibernated"
        time.sleep(0.3)
    assert raw.get(f"{ps.base_url}/v1/devboxes/{box.id}").json()["status"] == "suspended"
    box.resume()
    assert box.get_info().status == "running"
    assert _out(box, "cat ~/disk.txt; echo; cat ~/boots.txt") == "on disk\nboot\nboot\n"
    assert _out(box, "pgrep -x sleep || echo none") == "none\n", "processes should not survive hibernation"
    box.shutdown()


def test_sigkill_restart_keeps_boxes_suspended_state_and_ends_interrupted_snapshots(private):
    ps = private()
    _start(ps)
    sdk = RunloopSDK(base_url=ps.base_url, bearer_token=ps.key)
    raw = _raw(ps)
    running = sdk.devbox.create()
    _out(running, "nohup sleep 3600 >/dev/null 2>&1 & echo x > ~/f")
    frozen = sdk.devbox.create()
    _out(frozen, "echo y > ~/g")
    frozen.suspend()
    snapper = sdk.devbox.create()
    _out(snapper, "head -c 600M /dev/zero > ~/big.bin")
    sid = raw.post(f"{ps.base_url}/v1/devboxes/{snapper.id}/snapshot_disk_async", json={}).json()["id"]
    ps.crash()
    _start(ps)
    st = raw.get(f"{ps.base_url}/v1/devboxes/disk_snapshots/{sid}/status").json()
    assert st["status"] in ("error", "complete"), st
    if st["status"] == "error":
        assert st["error_message"]
    by_id = {d["id"]: d for d in raw.get(f"{ps.base_url}/v1/devboxes", params={"limit": 100}).json()["devboxes"]}
    assert by_id[running.id]["status"] == "running"
    assert by_id[frozen.id]["status"] == "suspended"
    assert by_id[snapper.id]["status"] == "running"
    assert _out(running, "cat ~/f; pgrep -x sleep >/dev/null && echo alive") == "x\nalive\n"
    frozen.resume()
    assert _out(frozen, "cat ~/g") == "y\n"
    # The box can be snapshotted again after the interrupted attempt.
    assert snapper.snapshot_disk(name="again").get_info().status == "complete"


def test_sigterm_keeps_boxes_by_default_and_on_exit_shutdown_stops_them(private):
    ps = private()
    _start(ps)
    sdk = RunloopSDK(base_url=ps.base_url, bearer_token=ps.key)
    box = sdk.devbox.create()
    _out(box, "echo kept > ~/k")
    ps.handle.proc.send_signal(signal.SIGTERM)
    ps.handle.proc.wait(timeout=30)
    _start(ps, "--on-exit", "shutdown")
    assert box.get_info().status == "running"
    assert _out(box, "cat ~/k") == "kept\n"
    ps.handle.proc.send_signal(signal.SIGTERM)
    ps.handle.proc.wait(timeout=60)
    _start(ps)
    info = box.get_info()
    assert info.status == "shutdown" and info.shutdown_reason == "api_shutdown", info


def test_disk_full_is_enospc_in_the_box_and_the_host_is_fine(raw, box_factory):
    box = box_factory.create(
        launch_parameters={
            "resource_size_request": "CUSTOM_SIZE",
            "custom_cpu_cores": 1,
            "custom_gb_memory": 2,
            "custom_disk_size": 2,
        }
    )
    neighbour = box_factory.create()
    host_free_before = os.statvfs("/").f_bavail
    r = box.cmd.exec("head -c 3G /dev/zero > ~/fill.bin; echo rc=$?; df -k ~ | tail -1")
    assert "No space left on device" in r.stderr(), (r.stdout(), r.stderr())
    assert "rc=1" in r.stdout()
    used_kb = int(r.stdout().split()[-4])
    assert used_kb <= 2 * 1024 * 1024, r.stdout()
    # The host lost at most the box's 2 GiB, and the neighbour is unaffected.
    lost = (host_free_before - os.statvfs("/").f_bavail) * os.statvfs("/").f_frsize
    assert lost < (2 << 30) + (256 << 20), lost
    assert _out(neighbour, "head -c 50M /dev/zero > ~/ok.bin && echo fine") == "fine\n"
    # Freeing space makes the box usable again.
    assert _out(box, "rm ~/fill.bin && echo again > ~/x && cat ~/x") == "again\n"
    u = raw.get(f"/v1/devboxes/{box.id}/usage").json()
    assert u["status"] == "running"


def test_oom_kill_is_logged_and_the_box_survives(raw, box_factory):
    box = box_factory.create(
        launch_parameters={"resource_size_request": "CUSTOM_SIZE", "custom_cpu_cores": 1, "custom_gb_memory": 1}
    )
    r = box.cmd.exec("python3 -c 'b = [bytearray(64 << 20) for _ in range(64)]'")
    assert r.exit_code == 137, (r.stdout(), r.stderr())
    deadline = time.monotonic() + 10
    while True:
        logs = raw.get(f"/v1/devboxes/{box.id}/logs").json()["logs"]
        oom = [e for e in logs if "out of memory" in (e.get("message") or "")]
        if oom or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert oom and oom[0]["level"] == "error", logs
    assert raw.get(f"/v1/devboxes/{box.id}/usage").json()["oom_kills"] >= 1
    assert _out(box, "echo alive") == "alive\n"


def test_a_box_killed_from_outside_is_reported_failed(raw, box_factory):
    box = box_factory.create()
    procs = open(f"/sys/fs/cgroup/pids/devboxd/{box.id}/cgroup.procs").read().split()
    init = min(int(p) for p in procs)
    os.kill(init, signal.SIGKILL)
    d = _wait_status(raw, box.id, ["failure"], timeout=30)
    assert d["failure_reason"] == "execution_failed" and d.get("failure_detail"), d
