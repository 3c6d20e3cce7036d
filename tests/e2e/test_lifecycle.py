"""Devbox lifecycle through the official SDK: create, get, list, update, shutdown, tenants, dedupe."""

from __future__ import annotations

import secrets
import time
import uuid

from _helpers import assert_json_error, describe, expect_api_error

REQUIRED_DEVBOX_FIELDS = {
    "id",
    "status",
    "capabilities",
    "create_time_ms",
    "launch_parameters",
    "metadata",
    "state_transitions",
}
BOOTING = {"queued", "scheduled", "provisioning", "initializing", "running"}


def _now_ms() -> int:
    return int(time.time() * 1000)


def test_create_reaches_running_and_get_info_fields(box_factory, raw):
    name = "e2e-info-" + secrets.token_hex(4)
    metadata = {"team": "e2e", "purpose": "get info check"}
    launch_parameters = {"resource_size_request": "SMALL", "keep_alive_time_seconds": 900}
    before = _now_ms()
    box = box_factory.create(name=name, metadata=metadata, launch_parameters=launch_parameters)
    after = _now_ms()

    info = box.get_info()
    assert info.id == box.id
    assert info.id.startswith("dbx_"), info.id
    assert info.status == "running"
    assert isinstance(info.create_time_ms, int)
    assert before - 5_000 <= info.create_time_ms <= after + 5_000, (before, info.create_time_ms, after)
    assert info.name == name
    assert info.metadata == metadata
    assert info.end_time_ms is None
    assert isinstance(info.capabilities, list)

    transitions = info.state_transitions
    assert transitions, "state_transitions must not be empty"
    assert transitions[-1].status == "running", transitions
    times = [t.transition_time_ms for t in transitions]
    assert all(isinstance(t, int) for t in times), times
    assert times == sorted(times), f"transition times not ordered: {times}"
    assert times[-1] >= info.create_time_ms

    lp = info.launch_parameters
    assert lp.resource_size_request == "SMALL"
    assert lp.keep_alive_time_seconds == 900

    # The raw JSON carries every field the SDK model marks as required.
    r = raw.get(f"/v1/devboxes/{box.id}")
    assert r.status_code == 200, describe(r)
    assert r.headers["content-type"].startswith("application/json"), describe(r)
    body = r.json()
    missing = REQUIRED_DEVBOX_FIELDS - set(body)
    assert not missing, f"DevboxView lacks required fields {missing}: {body}"
    assert body["id"] == box.id and body["status"] == "running"


def test_lowlevel_create_then_wait_with_from_id(client, sdk, box_factory):
    view = client.devboxes.create(name="e2e-lowlevel-" + secrets.token_hex(3), metadata={"via": "lowlevel"})
    box_factory.track(view.id, client)
    assert view.id.startswith("dbx_")
    assert view.status in BOOTING, view.status
    assert view.metadata == {"via": "lowlevel"}

    box = sdk.devbox.from_id(view.id)  # long-polls wait_for_status until running
    assert box.id == view.id
    info = box.get_info()
    assert info.status == "running"
    assert box.cmd.exec("echo ready").stdout() == "ready\n"


def test_list_autopaging_and_status_filter(client, sdk, box_factory):
    tag = secrets.token_hex(4)
    ids = []
    for i in range(3):
        v = client.devboxes.create(name=f"e2e-list-{tag}-{i}", metadata={"e2e_list": tag})
        box_factory.track(v.id, client)
        ids.append(v.id)
    assert len(set(ids)) == 3

    first = client.devboxes.list(limit=2)
    assert len(first.devboxes) == 2, [d.id for d in first.devboxes]
    assert first.has_more is True
    assert isinstance(first.total_count, int) and first.total_count >= 3, first.total_count

    seen = [d.id for d in client.devboxes.list(limit=2)]  # auto-paging walks every page
    assert len(seen) == len(set(seen)), f"duplicate ids across pages: {seen}"
    assert set(ids) <= set(seen), f"missing {set(ids) - set(seen)}"
    assert first.total_count == len(seen), (first.total_count, len(seen))

    # Explicit cursor: the page after the first one does not repeat it.
    second = client.devboxes.list(limit=2, starting_after=first.devboxes[-1].id)
    assert not {d.id for d in second.devboxes} & {d.id for d in first.devboxes}

    # Status filter.
    for devbox_id in ids:
        sdk.devbox.from_id(devbox_id)
    running = list(client.devboxes.list(status="running", limit=2))
    assert all(d.status == "running" for d in running), [(d.id, d.status) for d in running]
    assert set(ids) <= {d.id for d in running}

    client.devboxes.shutdown(ids[0])
    running = list(client.devboxes.list(status="running", limit=50))
    assert ids[0] not in {d.id for d in running}
    assert set(ids[1:]) <= {d.id for d in running}
    shut = list(client.devboxes.list(status="shutdown", limit=50))
    assert all(d.status == "shutdown" for d in shut)
    assert ids[0] in {d.id for d in shut}

    # High-level list (first page only) returns Devbox wrappers.
    listed = {d.id for d in sdk.devbox.list(limit=1000)}
    assert set(ids) <= listed


def test_update_name_and_metadata(devbox, client, raw):
    v = client.devboxes.update(devbox.id, name="e2e-renamed", metadata={"a": "1", "b": "2"})
    assert v.id == devbox.id
    assert v.name == "e2e-renamed"
    assert v.metadata == {"a": "1", "b": "2"}
    info = devbox.get_info()
    assert (info.name, info.metadata, info.status) == ("e2e-renamed", {"a": "1", "b": "2"}, "running")

    # metadata replaces; an omitted name is left unchanged
    v = client.devboxes.update(devbox.id, metadata={"c": "3"})
    assert v.name == "e2e-renamed"
    assert v.metadata == {"c": "3"}

    # raw POST /v1/devboxes/{id}: name only, metadata unchanged
    r = raw.post(f"/v1/devboxes/{devbox.id}", json={"name": "e2e-raw-name"})
    assert r.status_code == 200, describe(r)
    assert r.json()["name"] == "e2e-raw-name"
    assert r.json()["metadata"] == {"c": "3"}

    # empty values clear
    v = client.devboxes.update(devbox.id, name="", metadata={})
    assert not v.name, v.name
    assert v.metadata == {}
    assert devbox.get_info().metadata == {}


def test_shutdown_sets_reason_and_end_time_and_rejects_exec(box_factory, raw):
    box = box_factory.create()
    created = box.get_info()
    view = box.shutdown()
    assert view.id == box.id
    assert view.status == "shutdown"

    info = box.get_info()
    assert info.status == "shutdown"
    assert info.shutdown_reason == "api_shutdown"
    assert isinstance(info.end_time_ms, int)
    assert info.end_time_ms >= created.create_time_ms
    assert info.end_time_ms <= _now_ms() + 5_000
    assert info.state_transitions[-1].status == "shutdown", info.state_transitions

    r = raw.post(f"/v1/devboxes/{box.id}/execute_async", json={"command": "echo hi"})
    assert_json_error(r)
    r = raw.post(f"/v1/devboxes/{box.id}/write_file_contents", json={"file_path": "x.txt", "contents": "x"})
    assert_json_error(r)

    # waiting for "running" on a shut-down box answers at once with the terminal status
    t0 = time.monotonic()
    r = raw.post(
        f"/v1/devboxes/{box.id}/wait_for_status",
        json={"statuses": ["running", "failure", "shutdown"], "timeout_seconds": 10},
    )
    assert r.status_code == 200, describe(r)
    assert r.json()["status"] == "shutdown"
    assert time.monotonic() - t0 < 5


def test_create_is_deduplicated_by_x_request_id(raw, box_factory, client):
    name = "e2e-dedupe-" + secrets.token_hex(4)
    rid = f"e2e-{uuid.uuid4()}"
    path = "/v1/devboxes/create_and_await_running"

    r1 = raw.post(path, json={"name": name}, headers={"x-request-id": rid}, timeout=120)
    assert r1.status_code == 200, describe(r1)
    id1 = box_factory.track(r1.json()["id"])
    r2 = raw.post(path, json={"name": name}, headers={"x-request-id": rid}, timeout=120)
    assert r2.status_code == 200, describe(r2)
    assert r2.json()["id"] == id1

    r3 = raw.post(path, json={"name": name}, headers={"x-request-id": f"e2e-{uuid.uuid4()}"}, timeout=120)
    assert r3.status_code == 200, describe(r3)
    id3 = box_factory.track(r3.json()["id"])
    assert id3 != id1

    same_name = [d.id for d in client.devboxes.list(limit=100) if d.name == name]
    assert sorted(same_name) == sorted([id1, id3])


def test_tenant_isolation(devbox, client_b, sdk_b, client, box_factory):
    ex = devbox.cmd.exec("echo tenant-a")
    assert ex.stdout() == "tenant-a\n"
    eid = ex.execution_id

    expect_api_error(lambda: client_b.devboxes.retrieve(devbox.id), 404)
    expect_api_error(lambda: client_b.devboxes.execute_async(devbox.id, command="touch /tmp/pwned"), 404)
    expect_api_error(lambda: client_b.devboxes.executions.retrieve(eid, devbox_id=devbox.id), 404)
    expect_api_error(lambda: client_b.devboxes.read_file_contents(devbox.id, file_path=".profile"), 404)
    expect_api_error(
        lambda: client_b.devboxes.write_file_contents(devbox.id, file_path="/tmp/pwned", contents="x"), 404
    )
    expect_api_error(lambda: client_b.devboxes.update(devbox.id, name="stolen"), 404)
    expect_api_error(lambda: client_b.devboxes.shutdown(devbox.id), 404)
    assert devbox.id not in {d.id for d in client_b.devboxes.list(limit=1000)}

    # Tenant A's box is untouched.
    info = devbox.get_info()
    assert info.status == "running"
    assert info.name != "stolen"
    r = devbox.cmd.exec("test -e /tmp/pwned && echo PWNED || echo clean")
    assert r.stdout() == "clean\n"

    # And the other way round.
    box_b = box_factory.create(sdk=sdk_b)
    expect_api_error(lambda: client.devboxes.retrieve(box_b.id), 404)
    assert box_b.id not in {d.id for d in client.devboxes.list(limit=1000)}
    assert box_b.id in {d.id for d in client_b.devboxes.list(limit=1000)}
