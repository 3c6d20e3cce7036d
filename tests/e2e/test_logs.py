"""GET /v1/devboxes/{id}/logs: entries for launch commands, executions and file writes; the
execution_id and shell_name filters; the SDK's devbox.logs(); tenants."""

from __future__ import annotations

import time
from typing import Any, Dict, List

import pytest

from runloop_api_client import NotFoundError

from _helpers import assert_json_error, describe

SOURCES = {"setup_commands", "entrypoint", "exec", "files", "stats", "kmsg"}


def _logs(raw, box_id: str, **params: str) -> List[Dict[str, Any]]:
    r = raw.get(f"/v1/devboxes/{box_id}/logs", params=params)
    assert r.status_code == 200, describe(r)
    assert r.headers["content-type"].startswith("application/json"), describe(r)
    body = r.json()
    assert isinstance(body.get("logs"), list), body
    for e in body["logs"]:
        assert isinstance(e.get("level"), str) and e["level"], e
        assert e.get("source") in SOURCES, e
        assert isinstance(e.get("timestamp_ms"), int), e
    return body["logs"]


def _now_ms() -> int:
    return int(time.time() * 1000)


def test_logs_cover_launch_commands_executions_and_file_writes(box_factory, raw):
    t_start = _now_ms()
    launch = ["echo setup-one", "echo setup-two >&2"]
    box = box_factory.create(launch_parameters={"launch_commands": launch})

    ok = box.cmd.exec("echo hello")
    bad = box.cmd.exec("echo nope >&2; exit 4")
    box.file.write(file_path="logged.txt", contents="some text\n")
    t_end = _now_ms()

    logs = _logs(raw, box.id)
    stamps = [e["timestamp_ms"] for e in logs]
    assert stamps == sorted(stamps), "log entries are not in time order"
    assert all(t_start - 5_000 <= t <= t_end + 5_000 for t in stamps), (t_start, stamps, t_end)

    # launch commands, in order, before any execution
    setup = [e for e in logs if e["source"] == "setup_commands"]
    assert [c for c in dict.fromkeys(e.get("cmd") for e in setup)] == launch, setup
    first_exec = next(i for i, e in enumerate(logs) if e["source"] == "exec")
    assert all(logs.index(e) < first_exec for e in setup)

    # executions: the command, its id and, when it has finished, its exit code
    by_id: Dict[str, List[Dict[str, Any]]] = {}
    for e in logs:
        if e["source"] == "exec":
            by_id.setdefault(e.get("cmd_id"), []).append(e)
    assert set(by_id) >= {ok.execution_id, bad.execution_id}, by_id.keys()
    for ex, cmd, code in ((ok, "echo hello", 0), (bad, "echo nope >&2; exit 4", 4)):
        entries = by_id[ex.execution_id]
        assert all(e.get("cmd") == cmd for e in entries), entries
        assert [e["exit_code"] for e in entries if e.get("exit_code") is not None] == [code], entries

    # file writes
    files = [e for e in logs if e["source"] == "files"]
    assert len(files) == 1, files
    assert "logged.txt" in (files[0].get("message") or ""), files


def test_logs_filters(devbox, raw):
    a = devbox.cmd.exec("echo a")
    b = devbox.cmd.exec("echo b; exit 2")
    r = raw.post(f"/v1/devboxes/{devbox.id}/execute_sync", json={"command": "echo in-shell", "shell_name": "logshell"})
    assert r.status_code == 200, describe(r)
    r = raw.post(f"/v1/devboxes/{devbox.id}/execute_sync", json={"command": "echo other", "shell_name": "othershell"})
    assert r.status_code == 200, describe(r)

    only_a = _logs(raw, devbox.id, execution_id=a.execution_id)
    assert only_a, "execution_id filter returned nothing"
    assert {e.get("cmd_id") for e in only_a} == {a.execution_id}, only_a
    assert {e.get("cmd") for e in only_a} == {"echo a"}
    assert [e["exit_code"] for e in only_a if e.get("exit_code") is not None] == [0]

    only_b = _logs(raw, devbox.id, execution_id=b.execution_id)
    assert {e.get("cmd_id") for e in only_b} == {b.execution_id}
    assert [e["exit_code"] for e in only_b if e.get("exit_code") is not None] == [2]

    shell = _logs(raw, devbox.id, shell_name="logshell")
    assert shell, "shell_name filter returned nothing"
    assert {e.get("shell_name") for e in shell} == {"logshell"}, shell
    assert {e.get("cmd") for e in shell} == {"echo in-shell"}

    assert _logs(raw, devbox.id, execution_id="exe_doesnotexist") == []
    assert _logs(raw, devbox.id, shell_name="noshell") == []
    # an empty filter is no filter
    everything = _logs(raw, devbox.id)
    assert _logs(raw, devbox.id, execution_id="") == everything


def test_logs_with_the_python_sdk(devbox):
    r = devbox.cmd.exec("echo via-sdk")
    view = devbox.logs()
    entries = view.logs
    assert any(e.cmd_id == r.execution_id and e.exit_code == 0 for e in entries), entries
    for e in entries:
        assert e.level and e.source and isinstance(e.timestamp_ms, int)

    only = devbox.logs(execution_id=r.execution_id).logs
    assert only and all(e.cmd_id == r.execution_id for e in only)
    assert {e.cmd for e in only} == {"echo via-sdk"}


def test_logs_of_another_tenant_or_unknown_box_are_404(devbox, raw_b, raw, client_b):
    devbox.cmd.exec("echo secret-command")
    assert_json_error(raw_b.get(f"/v1/devboxes/{devbox.id}/logs"), 404)
    assert_json_error(raw_b.get(f"/v1/devboxes/{devbox.id}/logs", params={"execution_id": "x"}), 404)
    with pytest.raises(NotFoundError):
        client_b.devboxes.logs.list(devbox.id)
    assert_json_error(raw.get("/v1/devboxes/dbx_doesnotexist/logs"), 404)


def test_logs_remain_after_shutdown(box_factory, raw):
    box = box_factory.create()
    r = box.cmd.exec("echo before-shutdown")
    box.shutdown()
    logs = _logs(raw, box.id)
    assert any(e.get("cmd_id") == r.execution_id for e in logs), logs
