"""Other official SDKs, each in its own environment, for tests that drive them in a subprocess.

* `sdk2_python`: a Python interpreter with runloop-api-client 2.0.0 (the last Python SDK with
  named shells; it cannot be imported beside 3.0.0). Env DEVBOXD_SDK2_PYTHON names one; else
  <repo>/target/sdk2-venv is created (python3 -m venv + pip install) or reused.
* `ts_sdk_dir`: a directory whose node_modules has @runloop/api-client 1.32.0. Env
  DEVBOXD_TS_SDK_DIR names one; else <repo>/target/ts-sdk is created (npm init + npm install)
  or reused.

Test modules use them with `from _sdk_envs import sdk2_python, ts_sdk_dir` (pytest finds
fixtures imported into a module). A failure to build an environment fails the test that
needs it (with pip's/npm's output), it does not skip it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from _server import REPO_ROOT

SDK2_VERSION = "2.0.0"
TS_SDK_VERSION = "1.32.0"
SCRIPTS_DIR = Path(__file__).resolve().parent / "scripts"
SETUP_TIMEOUT_S = 600


def _run(cmd: List[str], cwd: Optional[Path] = None, timeout: float = SETUP_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _setup_failed(what: str, proc: subprocess.CompletedProcess) -> None:
    pytest.fail(
        f"could not set up {what}: {' '.join(map(str, proc.args))} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}",
        pytrace=False,
    )


def _python_has_sdk(python: Path) -> Tuple[bool, str]:
    check = "import runloop_api_client as r; print(r.__version__)"
    try:
        p = _run([str(python), "-c", check], timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, repr(e)
    return p.returncode == 0 and p.stdout.strip() == SDK2_VERSION, (p.stdout + p.stderr).strip()


@pytest.fixture(scope="session")
def sdk2_python() -> Path:
    given = os.environ.get("DEVBOXD_SDK2_PYTHON")
    if given:
        ok, info = _python_has_sdk(Path(given))
        if not ok:
            pytest.fail(f"DEVBOXD_SDK2_PYTHON={given} lacks runloop-api-client {SDK2_VERSION}: {info}", pytrace=False)
        return Path(given)
    venv = REPO_ROOT / "target" / "sdk2-venv"
    python = venv / "bin" / "python"
    if python.exists() and _python_has_sdk(python)[0]:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    p = _run(["python3", "-m", "venv", str(venv)])
    if p.returncode != 0:
        _setup_failed("the SDK 2.0.0 venv", p)
    p = _run([str(python), "-m", "pip", "install", "-q", f"runloop-api-client=={SDK2_VERSION}"])
    if p.returncode != 0:
        _setup_failed(f"runloop-api-client {SDK2_VERSION}", p)
    ok, info = _python_has_sdk(python)
    if not ok:
        pytest.fail(f"{python} still lacks runloop-api-client {SDK2_VERSION} after pip install: {info}", pytrace=False)
    return python


def _ts_version(d: Path) -> Optional[str]:
    try:
        return json.loads((d / "node_modules" / "@runloop" / "api-client" / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="session")
def ts_sdk_dir() -> Path:
    if shutil.which("node") is None:
        pytest.fail("node is not installed (the TypeScript SDK test needs Node.js >= 18)", pytrace=False)
    given = os.environ.get("DEVBOXD_TS_SDK_DIR")
    if given:
        v = _ts_version(Path(given))
        if v != TS_SDK_VERSION:
            pytest.fail(f"DEVBOXD_TS_SDK_DIR={given} has @runloop/api-client {v}, want {TS_SDK_VERSION}", pytrace=False)
        return Path(given)
    d = REPO_ROOT / "target" / "ts-sdk"
    if _ts_version(d) == TS_SDK_VERSION:
        return d
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "package.json").exists():
        p = _run(["npm", "init", "-y"], cwd=d)
        if p.returncode != 0:
            _setup_failed("the TS SDK directory", p)
    p = _run(["npm", "install", "--no-audit", "--no-fund", f"@runloop/api-client@{TS_SDK_VERSION}"], cwd=d)
    if p.returncode != 0:
        _setup_failed(f"@runloop/api-client {TS_SDK_VERSION}", p)
    if _ts_version(d) != TS_SDK_VERSION:
        pytest.fail(f"{d}: npm install did not yield @runloop/api-client {TS_SDK_VERSION}", pytrace=False)
    return d


def run_json_script(
    cmd: List[str], env: Dict[str, str], timeout: float, on_line: Optional[Any] = None
) -> Tuple[Any, str]:
    """Run a script that prints one JSON document as the last line of stdout; return it and stderr.

    `on_line(line)` is called for every stderr line as it arrives (e.g. to learn a devbox id early
    so the test can clean it up even if the script dies)."""
    full_env = dict(os.environ)
    full_env.update(env)
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env
    )
    out_lines: List[str] = []
    err_lines: List[str] = []

    def pump_out() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out_lines.append(line)

    def pump_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err_lines.append(line)
            if on_line is not None:
                try:
                    on_line(line.rstrip("\n"))
                except Exception:
                    pass

    threads = [threading.Thread(target=f, daemon=True) for f in (pump_out, pump_err)]
    for t in threads:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        proc.wait()
    for t in threads:
        t.join(10)
    out, stderr = "".join(out_lines), "".join(err_lines)
    if timed_out:
        raise AssertionError(
            f"{' '.join(cmd)} did not finish in {timeout}s\nstdout:\n{out[-3000:]}\nstderr:\n{stderr[-5000:]}"
        )
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{out[-3000:]}\nstderr:\n{stderr[-5000:]}"
    )
    last = [line for line in out.splitlines() if line.strip()]
    assert last, f"{' '.join(cmd)} printed nothing on stdout; stderr:\n{stderr[-5000:]}"
    try:
        return json.loads(last[-1]), stderr
    except ValueError:
        raise AssertionError(f"last stdout line is not JSON: {last[-1][:500]!r}\nstderr:\n{stderr[-5000:]}") from None
