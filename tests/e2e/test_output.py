"""Execution output: stdout and stderr kept apart, `last_n` and `*_truncated` exact, and a large
output delivered byte for byte through the SDK (which streams it when the inline view is cut)."""

from __future__ import annotations

import hashlib

import pytest

from _helpers import describe


def _lines(prefix: str, a: int, b: int) -> str:
    return "".join(f"{prefix}{i}\n" for i in range(a, b + 1))


def test_stdout_and_stderr_are_separate(devbox):
    r = devbox.cmd.exec(
        "for i in $(seq 1 50); do echo out-$i; echo err-$i >&2; done; printf tail-out; printf tail-err >&2"
    )
    assert r.exit_code == 0
    assert r.stdout() == _lines("out-", 1, 50) + "tail-out"
    assert r.stderr() == _lines("err-", 1, 50) + "tail-err"

    # only stderr / only stdout
    r = devbox.cmd.exec("echo only-err >&2")
    assert (r.stdout(), r.stderr()) == ("", "only-err\n")
    r = devbox.cmd.exec("echo only-out")
    assert (r.stdout(), r.stderr()) == ("only-out\n", "")
    # 2>&1 folds stderr into stdout inside the box: the server must not split it again
    r = devbox.cmd.exec("{ echo a; echo b >&2; echo c; } 2>&1")
    assert (r.stdout(), r.stderr()) == ("a\nb\nc\n", "")


def test_last_n_and_truncated_flags_are_exact(devbox, client, raw):
    r = devbox.cmd.exec("seq 1 150; seq 1001 1150 >&2")
    assert r.exit_code == 0
    eid = r.execution_id
    all_out = _lines("", 1, 150)
    all_err = _lines("", 1001, 1150)

    def view(last_n):
        return client.devboxes.executions.retrieve(eid, devbox_id=devbox.id, last_n=last_n)

    v = view("10")
    assert v.stdout == _lines("", 141, 150)
    assert v.stderr == _lines("", 1141, 1150)
    assert v.stdout_truncated is True and v.stderr_truncated is True

    v = view("1000")
    assert v.stdout == all_out and v.stderr == all_err
    assert v.stdout_truncated is False and v.stderr_truncated is False

    # the boundary: exactly as many lines as there are is not truncated; one fewer is
    v = view("150")
    assert (v.stdout, v.stdout_truncated) == (all_out, False)
    assert (v.stderr, v.stderr_truncated) == (all_err, False)
    v = view("149")
    assert (v.stdout, v.stdout_truncated) == (_lines("", 2, 150), True)
    assert (v.stderr, v.stderr_truncated) == (_lines("", 1002, 1150), True)

    v = view("1")
    assert (v.stdout, v.stdout_truncated) == ("150\n", True)

    # default: the last 100 lines
    v = client.devboxes.executions.retrieve(eid, devbox_id=devbox.id)
    assert (v.stdout, v.stdout_truncated) == (_lines("", 51, 150), True)
    assert (v.stderr, v.stderr_truncated) == (_lines("", 1051, 1150), True)

    # last_n on wait_for_status and on execute
    resp = raw.post(
        f"/v1/devboxes/{devbox.id}/executions/{eid}/wait_for_status",
        params={"last_n": "3"},
        json={"statuses": ["completed"], "timeout_seconds": 5},
    )
    assert resp.status_code == 200, describe(resp)
    body = resp.json()
    assert (body["stdout"], body["stdout_truncated"]) == ("148\n149\n150\n", True)
    assert (body["stderr"], body["stderr_truncated"]) == ("1148\n1149\n1150\n", True)

    resp = raw.post(f"/v1/devboxes/{devbox.id}/execute", params={"last_n": "2"}, json={"command": "seq 1 5"})
    assert resp.status_code == 200, describe(resp)
    body = resp.json()
    assert body["status"] == "completed", body
    assert (body["stdout"], body["stdout_truncated"], body["stderr"], body["stderr_truncated"]) == (
        "4\n5\n",
        True,
        "",
        False,
    )

    # a short output is never flagged
    r = devbox.cmd.exec("seq 1 3")
    assert (r.result.stdout, r.result.stdout_truncated) == ("1\n2\n3\n", False)
    assert r.result.stderr_truncated is False

    # last_n that is not a number is a 400, not a crash
    resp = raw.get(f"/v1/devboxes/{devbox.id}/executions/{eid}", params={"last_n": "ten"})
    assert resp.status_code == 400, describe(resp)


BIG_LINES = 1_310_720  # 16-byte lines: exactly 20 MiB


@pytest.mark.deadline(240)
def test_twenty_mib_of_stdout_arrive_exactly(devbox):
    expected = "".join(f"{i:015d}\n" for i in range(BIG_LINES)).encode()
    assert len(expected) == 20 * 1024 * 1024
    r = devbox.cmd.exec(f"awk 'BEGIN {{ for (i = 0; i < {BIG_LINES}; i++) printf \"%015d\\n\", i }}'")
    assert r.exit_code == 0, r.stderr()
    assert r.result.stdout_truncated is True
    assert r.result.stdout == "".join(f"{i:015d}\n" for i in range(BIG_LINES - 100, BIG_LINES))
    out = r.stdout().encode()  # streamed by the SDK
    if out != expected:
        # a readable diagnosis instead of a 20 MiB diff
        first_diff = next((i for i, (a, b) in enumerate(zip(out, expected)) if a != b), min(len(out), len(expected)))
        raise AssertionError(
            f"stdout differs: got {len(out)} bytes (sha256 {hashlib.sha256(out).hexdigest()[:16]}), "
            f"want {len(expected)}; first difference at byte {first_diff}: "
            f"got {out[first_diff - 20:first_diff + 20]!r}, want {expected[first_diff - 20:first_diff + 20]!r}"
        )
    assert r.stderr() == ""
