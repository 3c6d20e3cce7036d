"""Bad input and error mapping (raw HTTP): every rejection is a 4xx with a JSON body, never a 5xx."""

from __future__ import annotations

import http.client
import select
import socket
import urllib.parse
from itertools import chain, repeat

import pytest

from runloop_api_client import AuthenticationError, NotFoundError, Runloop

from _helpers import assert_json_error, describe

JSON = {"Content-Type": "application/json"}


def _track_if_created(box_factory, r):
    """If a request that should have been rejected created a devbox anyway, make sure it is cleaned up."""
    if r.status_code == 200:
        try:
            box_factory.track(r.json()["id"])
        except Exception:
            pass


def test_healthz_needs_no_auth(make_raw):
    r = make_raw(None).get("/healthz")
    assert r.status_code == 200, describe(r)


def test_missing_or_wrong_api_key_is_401(make_raw, base_url, raw, box_factory):
    before = raw.get("/v1/devboxes", params={"limit": 1}).json()["total_count"]

    anon = make_raw(None)
    assert_json_error(anon.get("/v1/devboxes"), 401)
    r = anon.post("/v1/devboxes/create_and_await_running", json={"name": "e2e-unauth"})
    _track_if_created(box_factory, r)
    assert_json_error(r, 401)

    wrong = make_raw("definitely-not-a-key")
    assert_json_error(wrong.get("/v1/devboxes"), 401)
    r = wrong.post("/v1/devboxes", json={"name": "e2e-wrongkey"})
    _track_if_created(box_factory, r)
    assert_json_error(r, 401)

    for header in ("Basic dXNlcjpwYXNz", "Bearer ", "bearer", ""):
        r = anon.get("/v1/devboxes", headers={"Authorization": header})
        assert_json_error(r, 401)

    with pytest.raises(AuthenticationError):
        Runloop(base_url=base_url, bearer_token="nope", max_retries=0).devboxes.list()

    after = raw.get("/v1/devboxes", params={"limit": 1}).json()["total_count"]
    assert after == before, "an unauthenticated request created a devbox"


def test_unknown_ids_and_routes_are_404(raw, devbox, client):
    assert_json_error(raw.get("/v1/devboxes/dbx_doesnotexist"), 404)
    assert_json_error(raw.post("/v1/devboxes/dbx_doesnotexist/execute_async", json={"command": "true"}), 404)
    assert_json_error(raw.post("/v1/devboxes/dbx_doesnotexist/shutdown"), 404)
    assert_json_error(
        raw.post("/v1/devboxes/dbx_doesnotexist/wait_for_status", json={"statuses": ["running"], "timeout_seconds": 1}),
        404,
    )

    base = f"/v1/devboxes/{devbox.id}/executions/exe_doesnotexist"
    assert_json_error(raw.get(base), 404)
    assert_json_error(raw.post(base + "/wait_for_status", json={"statuses": ["completed"], "timeout_seconds": 1}), 404)
    assert_json_error(raw.post(base + "/kill", json={}), 404)

    assert_json_error(raw.get("/v1/does_not_exist"), 404)
    assert_json_error(raw.get("/definitely/not/a/route"), 404)

    with pytest.raises(NotFoundError):
        client.devboxes.retrieve("dbx_doesnotexist")

    # wrong method on a known route: some 4xx, not a crash
    r = raw.get(f"/v1/devboxes/{devbox.id}/execute_async")
    assert 400 <= r.status_code < 500, describe(r)


def test_malformed_json_is_400(raw, devbox, box_factory):
    r = raw.post("/v1/devboxes", data=b'{"name": ', headers=JSON)
    _track_if_created(box_factory, r)
    assert_json_error(r, 400)

    r = raw.post(f"/v1/devboxes/{devbox.id}/execute_async", data=b"{not json", headers=JSON)
    assert_json_error(r, 400)

    r = raw.post(f"/v1/devboxes/{devbox.id}/write_file_contents", data=b"\xff\xfe garbage", headers=JSON)
    assert_json_error(r, 400)

    r = raw.post("/v1/devboxes", json=[1, 2, 3])
    _track_if_created(box_factory, r)
    assert_json_error(r, 400)


def test_wrong_types_are_400(raw, devbox, box_factory):
    for body in (
        {"name": 5},
        {"metadata": {"k": 1}},
        {"metadata": "not-a-map"},
        {"environment_variables": ["A=1"]},
        {"launch_parameters": {"keep_alive_time_seconds": "soon"}},
        {"launch_parameters": {"resource_size_request": "GIGANTIC"}},
        {"launch_parameters": {"launch_commands": "echo not-a-list"}},
    ):
        r = raw.post("/v1/devboxes", json=body)
        _track_if_created(box_factory, r)
        assert r.status_code == 400, f"{body}: {describe(r)}"
        assert_json_error(r, 400)

    for body in ({"command": 5}, {"command": ["echo", "hi"]}, {"command": None}):
        r = raw.post(f"/v1/devboxes/{devbox.id}/execute_async", json=body)
        assert r.status_code == 400, f"{body}: {describe(r)}"
        assert_json_error(r, 400)

    r = raw.post(f"/v1/devboxes/{devbox.id}/wait_for_status", json={"statuses": "running"})
    assert_json_error(r, 400)
    r = raw.post(f"/v1/devboxes/{devbox.id}/wait_for_status", json={"statuses": ["bogus"]})
    assert_json_error(r, 400)
    r = raw.post(f"/v1/devboxes/{devbox.id}/wait_for_status", json={"statuses": ["running"], "timeout_seconds": "x"})
    assert_json_error(r, 400)


def test_missing_required_fields_are_400(raw, devbox):
    assert_json_error(raw.post(f"/v1/devboxes/{devbox.id}/execute_async", json={}), 400)
    assert_json_error(raw.post(f"/v1/devboxes/{devbox.id}/execute", json={"command_id": "x"}), 400)
    assert_json_error(raw.post(f"/v1/devboxes/{devbox.id}/write_file_contents", json={"contents": "x"}), 400)
    assert_json_error(raw.post(f"/v1/devboxes/{devbox.id}/read_file_contents", json={}), 400)
    assert_json_error(raw.post(f"/v1/devboxes/{devbox.id}/download_file", json={}), 400)
    assert_json_error(raw.post(f"/v1/devboxes/{devbox.id}/wait_for_status", json={}), 400)

    # the box is unaffected by all of that
    assert devbox.cmd.exec("echo still-fine").stdout() == "still-fine\n"


def _post_large(base_url: str, path: str, key: str, head: bytes, filler: bytes, count: int, tail: bytes):
    """POST a large body in chunks, stopping early as soon as the server answers (e.g. 413 after
    reading only part of it). Returns (status, content_type, body)."""
    u = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    total = len(head) + len(filler) * count + len(tail)
    conn.putrequest("POST", path)
    conn.putheader("Authorization", f"Bearer {key}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(total))
    conn.endheaders()
    sock = conn.sock
    sock.settimeout(10)
    try:
        for part in chain([head], repeat(filler, count), [tail]):
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break  # the server already answered
            sock.sendall(part)
    except (BrokenPipeError, ConnectionResetError, socket.timeout):
        pass  # server stopped reading; its answer should be waiting for us
    sock.settimeout(60)
    try:
        resp = conn.getresponse()
        return resp.status, resp.getheader("content-type") or "", resp.read()
    except (ConnectionResetError, http.client.RemoteDisconnected) as e:
        raise AssertionError(f"server dropped the connection without an HTTP answer to an oversized body: {e!r}")
    finally:
        conn.close()


@pytest.mark.slow
def test_oversized_json_body_is_413(base_url, key_a, devbox, raw):
    head = b'{"file_path": "e2e_huge.txt", "contents": "'
    filler = b"a" * 65536
    status, ctype, body = _post_large(
        base_url, f"/v1/devboxes/{devbox.id}/write_file_contents", key_a, head, filler, 80 * 16, b'"}'
    )
    assert status == 413, (status, ctype, body[:300])
    assert "json" in ctype.lower(), (ctype, body[:300])

    # the server survived, and nothing was written
    assert raw.get("/healthz").status_code == 200
    r = devbox.cmd.exec("test -e /home/user/e2e_huge.txt && echo present || echo absent")
    assert r.stdout() == "absent\n"


def test_framework_rejections_are_json_too(raw):
    # A path segment that is not UTF-8, and a multipart upload without a boundary: the HTTP
    # framework rejects these before any handler runs; the answer is still a JSON 4xx.
    assert_json_error(raw.get("/v1/devboxes/%FF"), 400)
    r = raw.post("/v1/devboxes/dbx_whatever/upload_file", data=b"x", headers={"Content-Type": "text/plain"})
    assert_json_error(r, 400)
