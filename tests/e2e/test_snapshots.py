"""Disk snapshots with the official SDK: consistent, layered, listable, deletable."""

from __future__ import annotations

import time

import pytest
from runloop_api_client import NotFoundError

from _helpers import describe


def _out(box, cmd: str) -> str:
    r = box.cmd.exec(cmd)
    assert r.exit_code == 0, (cmd, r.stdout(), r.stderr())
    return r.stdout()


def test_snapshot_then_create_from_it_has_the_files(sdk, box_factory):
    box = box_factory.create()
    box.file.write(file_path="notes/a.txt", contents="alpha\n")
    _out(box, "sudo rm /etc/debian_version && echo sys | sudo tee /etc/marker >/dev/null")
    snap = box.snapshot_disk(name="s1", metadata={"team": "e2e", "k": "v1"}, commit_message="first")
    info = snap.get_info()
    assert info.status == "complete", info
    assert info.snapshot.name == "s1" and info.snapshot.metadata == {"team": "e2e", "k": "v1"}
    assert info.snapshot.source_devbox_id == box.id
    assert info.snapshot.size_bytes and info.snapshot.size_bytes > 0

    child = box_factory.create(snapshot_id=snap.id)
    assert child.get_info().snapshot_id == snap.id
    assert _out(child, "cat ~/notes/a.txt /etc/marker; test -e /etc/debian_version && echo present || echo gone") == (
        "alpha\nsys\ngone\n"
    )
    # The child's writes are its own.
    _out(child, "echo child > ~/notes/a.txt")
    assert box.file.read(file_path="notes/a.txt") == "alpha\n"

    # Snapshot of a snapshot-born box stacks on its parent.
    _out(child, "echo beta > ~/notes/b.txt && rm ~/notes/a.txt")
    snap2 = child.snapshot_disk(name="s2")
    grandchild = sdk.devbox.create_from_snapshot(snap2.id)
    try:
        assert _out(grandchild, "cat ~/notes/b.txt /etc/marker; ls ~/notes") == "beta\nsys\nb.txt\n"
    finally:
        grandchild.shutdown()


def test_async_snapshot_list_update_delete(sdk, raw, box_factory):
    box = box_factory.create()
    box.file.write(file_path="f.txt", contents="x")
    r = raw.post(f"/v1/devboxes/{box.id}/snapshot_disk_async", json={"name": "a1", "metadata": {"kind": "async"}})
    assert r.status_code == 200, describe(r)
    sid = r.json()["id"]
    assert sid.startswith("snp_")
    deadline = time.time() + 30
    while True:
        st = raw.get(f"/v1/devboxes/disk_snapshots/{sid}/status").json()
        if st["status"] != "in_progress" or time.time() > deadline:
            break
        time.sleep(0.2)
    assert st["status"] == "complete", st
    assert st["snapshot"]["id"] == sid

    other = box.snapshot_disk(name="a2", metadata={"kind": "other"})
    ids = [s.id for s in sdk.snapshot.list(devbox_id=box.id)]
    assert set(ids) == {sid, other.id}
    page = raw.get("/v1/devboxes/disk_snapshots", params={"devbox_id": box.id, "limit": 1}).json()
    assert len(page["snapshots"]) == 1 and page["has_more"] is True and page["total_count"] == 2
    nxt = raw.get(
        "/v1/devboxes/disk_snapshots",
        params={"devbox_id": box.id, "limit": 1, "starting_after": page["snapshots"][0]["id"]},
    ).json()
    assert len(nxt["snapshots"]) == 1 and nxt["has_more"] is False
    by_meta = raw.get("/v1/devboxes/disk_snapshots", params={"metadata[kind]": "async"}).json()
    assert [s["id"] for s in by_meta["snapshots"]] == [sid]
    by_in = raw.get("/v1/devboxes/disk_snapshots", params={"metadata[kind][in]": "async,other"}).json()
    assert {s["id"] for s in by_in["snapshots"]} >= {sid, other.id}

    updated = raw.post(f"/v1/devboxes/disk_snapshots/{sid}", json={"name": "renamed", "metadata": {"n": "1"}})
    assert updated.status_code == 200, describe(updated)
    assert updated.json()["name"] == "renamed" and updated.json()["metadata"] == {"n": "1"}

    # A box from the snapshot keeps working after the snapshot is deleted.
    child = box_factory.create(snapshot_id=sid)
    assert raw.post(f"/v1/devboxes/disk_snapshots/{sid}/delete").status_code == 200
    assert raw.get(f"/v1/devboxes/disk_snapshots/{sid}/status").json()["status"] == "deleted"
    assert sid not in [s.id for s in sdk.snapshot.list(devbox_id=box.id)]
    assert child.file.read(file_path="f.txt") == "x"
    assert _out(child, "echo still-works") == "still-works\n"
    r = raw.post("/v1/devboxes/create_and_await_running", json={"snapshot_id": sid})
    assert r.status_code == 404, describe(r)


def test_snapshot_of_suspended_box_keeps_it_suspended(sdk, box_factory):
    box = box_factory.create()
    box.file.write(file_path="s.txt", contents="suspended")
    box.suspend()
    assert box.get_info().status == "suspended"
    snap = box.snapshot_disk(name="while-suspended")
    assert box.get_info().status == "suspended"
    child = box_factory.create(snapshot_id=snap.id)
    assert child.file.read(file_path="s.txt") == "suspended"
    box.resume()
    assert _out(box, "cat ~/s.txt") == "suspended"


def test_shutdown_during_snapshot_is_409_unless_forced(raw, box_factory):
    box = box_factory.create()
    _out(box, "head -c 400M /dev/zero > ~/big.bin")
    r = raw.post(f"/v1/devboxes/{box.id}/snapshot_disk_async", json={})
    assert r.status_code == 200, describe(r)
    sid = r.json()["id"]
    # Copying 400 MB takes far longer than this request needs to arrive.
    r = raw.post(f"/v1/devboxes/{box.id}/shutdown")
    assert r.status_code == 409, describe(r)
    assert r.headers.get("x-should-retry") == "false"
    assert "force=true" in r.json()["error"]["message"]
    r = raw.post(f"/v1/devboxes/{box.id}/shutdown", params={"force": "true"})
    assert r.status_code == 200, describe(r)
    assert r.json()["status"] == "shutdown"


def test_snapshots_are_per_tenant(sdk, raw_b, box_factory):
    box = box_factory.create()
    snap = box.snapshot_disk(name="private")
    assert raw_b.get(f"/v1/devboxes/disk_snapshots/{snap.id}/status").status_code == 404
    assert raw_b.post(f"/v1/devboxes/disk_snapshots/{snap.id}/delete").status_code == 404
    assert snap.id not in [s["id"] for s in raw_b.get("/v1/devboxes/disk_snapshots").json()["snapshots"]]
    r = raw_b.post("/v1/devboxes/create_and_await_running", json={"snapshot_id": snap.id})
    assert r.status_code == 404, describe(r)
    with pytest.raises(NotFoundError):
        sdk.api.devboxes.disk_snapshots.query_status("snp_doesnotexist")
