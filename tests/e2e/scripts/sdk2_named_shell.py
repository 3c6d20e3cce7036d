"""Named shells through the official Python SDK 2.0.0 (run by test_named_shells.py in its own venv).

Env: RUNLOOP_BASE_URL, RUNLOOP_API_KEY (read by the SDK), E2E_DEVBOX_ID (a running devbox the
test created and will shut down). Prints one JSON object with what it observed as the last line
of stdout; the test asserts on it.
"""

import json
import os
import sys
import threading

import runloop_api_client
from runloop_api_client import RunloopSDK


def res(r):
    return {"exit_code": r.exit_code, "stdout": r.stdout(), "stderr": r.stderr(), "execution_id": r.execution_id}


def main() -> None:
    sdk = RunloopSDK()
    box = sdk.devbox.from_id(os.environ["E2E_DEVBOX_ID"])
    out = {"sdk_version": runloop_api_client.__version__}

    s1 = box.shell("sdk2-s1")
    s2 = box.shell("sdk2-s2")
    out["setup"] = res(s1.exec("cd /tmp && export FOO=bar"))
    out["s1_state"] = res(s1.exec('pwd; echo "$FOO"'))
    out["s2_state"] = res(s2.exec('pwd; echo "${FOO:-unset}"'))
    out["plain_state"] = res(box.cmd.exec('pwd; echo "${FOO:-unset}"'))
    out["exit3"] = res(s1.exec("echo leaving; exit 3"))
    out["after_exit"] = res(s1.exec('pwd; echo "$FOO"'))

    # exec_async in a shell: serialized behind each other, state shared
    execs = [s1.exec_async(f"echo start-{i} >> order.txt; sleep 0.3; echo end-{i} >> order.txt") for i in range(3)]
    out["queued_statuses"] = [e.get_state().status for e in execs]
    out["async_results"] = [res(e.result()) for e in execs]
    out["order"] = res(s1.exec("cat /tmp/order.txt"))

    # streaming callbacks through a shell
    got = []
    lock = threading.Lock()

    def cb(text):
        with lock:
            got.append(text)

    r = s1.exec('for i in 1 2 3; do echo "$FOO-$i"; done', stdout=cb)
    out["callbacks"] = {"result": res(r), "seen": "".join(got)}

    # the views carry the shell name
    state = execs[0].get_state()
    out["view_shell_name"] = state.shell_name
    out["plain_view_shell_name"] = sdk.api.devboxes.executions.retrieve(
        out["plain_state"]["execution_id"], devbox_id=box.id
    ).shell_name

    # logs filtered by shell name (SDK 2.0.0 still has the parameter)
    logs = box.logs(shell_name="sdk2-s2").logs
    out["s2_logs"] = [{"cmd": e.cmd, "cmd_id": e.cmd_id, "shell_name": e.shell_name, "source": e.source} for e in logs]

    print(json.dumps(out))


if __name__ == "__main__":
    try:
        main()
    except Exception:
        import traceback

        traceback.print_exc()
        sys.exit(1)
