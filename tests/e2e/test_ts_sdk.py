"""The official TypeScript SDK (@runloop/api-client 1.32.0) on Node, in a subprocess: create,
cmd.exec (POST /execute + execution long poll), execAsync, callbacks, named shells, kill, files."""

from __future__ import annotations

import pytest

from _sdk_envs import SCRIPTS_DIR, TS_SDK_VERSION, run_json_script, ts_sdk_dir  # noqa: F401  (fixture)


def _lines(a: int, b: int) -> str:
    return "".join(f"{i}\n" for i in range(a, b + 1))


@pytest.mark.deadline(600)
def test_typescript_sdk_end_to_end(ts_sdk_dir, base_url, key_a, box_factory, client):
    created = []

    def on_line(line: str) -> None:
        if line.startswith("DEVBOX_ID="):
            created.append(box_factory.track(line.split("=", 1)[1].strip(), client))

    out, stderr = run_json_script(
        ["node", str(SCRIPTS_DIR / "ts_sdk.cjs")],
        env={"RUNLOOP_BASE_URL": base_url, "RUNLOOP_API_KEY": key_a, "TS_SDK_DIR": str(ts_sdk_dir)},
        timeout=240,
        on_line=on_line,
    )

    def o(key: str) -> tuple:
        return (out[key]["exit_code"], out[key]["stdout"], out[key]["stderr"])

    assert out["sdk_version"] == TS_SDK_VERSION
    assert created == [out["devbox_id"]]
    assert out["info"] == {"status": "running", "name": "e2e-ts-sdk", "metadata": {"via": "ts"}}

    assert o("exec") == (0, "hi\n", "")
    assert o("exec_fail") == (3, "out\n", "err\n")
    assert o("exec_slow") == (0, "slow\n", "")
    assert out["async_initial_status"] in ("queued", "running")
    assert o("async") == (0, "async\n", "")

    cb = out["callbacks"]
    res = cb["result"]
    assert (res["exit_code"], res["stdout"], res["stderr"]) == (0, "o1\no2\no3\n", "e1\ne2\ne3\n")
    assert cb["seen"]["out"] == "o1\no2\no3\n"
    assert cb["seen"]["err"] == "e1\ne2\ne3\n"
    assert sorted(cb["seen"]["all"].splitlines()) == ["e1", "e2", "e3", "o1", "o2", "o3"]

    assert out["long"]["truncated"] is True
    assert out["long"]["stdout"] == _lines(1, 500)
    assert out["long"]["last3"] == "498\n499\n500"

    assert o("shell_setup") == (0, "", "")
    assert o("shell_state") == (0, "/tmp\nbar\n", "")
    assert o("other_shell") == (0, "/home/user\nunset\n", "")
    assert o("plain") == (0, "/home/user\nunset\n", "")
    assert o("shell_async") == (0, "async-bar\n/tmp\n", "")
    assert out["shell_view_name"] == "s1"
    assert out["shell_logs"] and all(e["shell_name"] == "s1" for e in out["shell_logs"]), out["shell_logs"]
    assert {e["cmd"] for e in out["shell_logs"]} >= {"cd /tmp && export FOO=bar", 'pwd; echo "$FOO"'}

    assert out["killed"] == 137
    assert out["file"] == "from ts\n"
    assert out["shutdown_status"] == "shutdown"
