"""End-to-end fixtures: start a real devboxd and talk to it with the official SDK.

Environment:
  DEVBOXD_BIN        server binary (default <repo>/target/release/devboxd)
  DEVBOXD_IMAGE_DIR  --image-dir passed to the server (default <repo>/target/images)
  DEVBOXD_KEEP_DATA  if set to 1, keep the server's temporary data dir after the run
  DEVBOXD_BASE_URL   use an already running server instead of starting one; then
                     DEVBOXD_KEY_A and DEVBOXD_KEY_B must name two API keys (two tenants)

The server is started once per session:
  devboxd serve --listen 127.0.0.1:<port> --data-dir <tmp> --image-dir <img>
                --api-key <KEY_A> --api-key <KEY_B>
Its stdout/stderr go to <tmp>/devboxd.log. The part of the log written while a test ran
is attached to that test's failure report, and the tail is printed at the end of a
failing session.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import pytest

from runloop_api_client import Runloop, RunloopSDK

from _helpers import RawSession, shutdown_quietly
from _server import (
    EXTRA_LOGS_KEY,
    ServerHandle,
    ServerStartError,
    binary_path,
    free_port,
    mounts_under,
    new_key,
    spawn,
    stop_process,
    wait_healthy,
)

HEALTH_TIMEOUT_S = 600.0  # the first start may build the base image
DEFAULT_TEST_DEADLINE_S = 300

_STATE: dict = {"server": None, "failed": False, "notes": []}
_LOG_OFFSET_KEY = pytest.StashKey[int]()


# --------------------------------------------------------------------------- hooks


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes tens of seconds (resource limits, big transfers)")
    config.addinivalue_line("markers", "isolation: checks that a box cannot see or harm the host")
    config.addinivalue_line("markers", "deadline(seconds): wall-clock limit for one test (default 300 s)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    _STATE["failed"] = True
    for title, handle, offset in item.stash.get(EXTRA_LOGS_KEY, []):
        text = handle.read_log(offset)
        if text:
            rep.sections.append((f"{title} during {rep.when} ({handle.log_path})", text))
    srv: Optional[ServerHandle] = _STATE["server"]
    if srv is None or srv.log_path is None:
        return
    start = item.stash.get(_LOG_OFFSET_KEY, None)
    if start is None:
        return
    text = srv.read_log(start)
    if text:
        rep.sections.append((f"devboxd log during {rep.when} ({srv.log_path})", text))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for note in _STATE["notes"]:
        terminalreporter.write_line(f"[e2e] {note}")
    srv: Optional[ServerHandle] = _STATE["server"]
    if srv is None or srv.log_path is None:
        return
    if not (_STATE["failed"] or exitstatus not in (0, 5)):
        return
    terminalreporter.section("devboxd server log (tail)")
    terminalreporter.write_line(f"full log: {srv.log_path}")
    terminalreporter.write_line(srv.read_log(0, max_lines=150))


# ------------------------------------------------------------------ server process


_free_port = free_port
_mounts_under = mounts_under
_stop_process = stop_process


def _start_server() -> ServerHandle:
    bin_path = binary_path()
    if not bin_path.is_file() or not os.access(bin_path, os.X_OK):
        pytest.fail(f"devboxd binary not found or not executable: {bin_path} (set DEVBOXD_BIN)", pytrace=False)

    tmp = Path(tempfile.mkdtemp(prefix="devboxd-e2e-"))
    data_dir = tmp / "data"
    data_dir.mkdir()
    handle = ServerHandle(
        base_url="",
        key_a=new_key("a"),
        key_b=new_key("b"),
        data_dir=data_dir,
        log_path=tmp / "devboxd.log",
    )
    spawn(handle, free_port())
    atexit.register(_stop_process, handle.proc)
    _STATE["server"] = handle
    try:
        wait_healthy(handle, HEALTH_TIMEOUT_S)
    except ServerStartError as e:
        pytest.fail(str(e), pytrace=False)
    return handle


def _stop_server(handle: ServerHandle) -> None:
    if handle.proc is not None:
        _stop_process(handle.proc)
        if handle.proc.returncode not in (0, None, -signal.SIGTERM):
            _STATE["notes"].append(f"devboxd exited with code {handle.proc.returncode} after SIGTERM")
    if handle._log_file is not None:
        handle._log_file.close()
    if handle.data_dir is None:
        return
    tmp = handle.data_dir.parent
    if _STATE["failed"] or os.environ.get("DEVBOXD_KEEP_DATA") == "1":
        _STATE["notes"].append(f"kept devboxd data dir and log in {tmp}")
        return
    leftover = _mounts_under(tmp)
    if leftover:
        # Never rmtree through a leaked mount (it could point into the host or a box).
        _STATE["notes"].append(f"NOT removing {tmp}: mounts still present below it: {leftover}")
        return
    shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def server() -> ServerHandle:
    external = os.environ.get("DEVBOXD_BASE_URL")
    if external:
        key_a = os.environ.get("DEVBOXD_KEY_A")
        key_b = os.environ.get("DEVBOXD_KEY_B")
        if not key_a or not key_b:
            pytest.fail("DEVBOXD_BASE_URL needs DEVBOXD_KEY_A and DEVBOXD_KEY_B", pytrace=False)
        handle = ServerHandle(base_url=external.rstrip("/"), key_a=key_a, key_b=key_b)
        _STATE["server"] = handle
        yield handle
        return
    handle = _start_server()
    try:
        yield handle
    finally:
        _stop_server(handle)


@pytest.fixture(autouse=True)
def _per_test_bookkeeping(request: pytest.FixtureRequest, server: ServerHandle) -> Any:
    """Remember where the server log was when the test started, and enforce a deadline."""
    request.node.stash[_LOG_OFFSET_KEY] = server.log_size()
    marker = request.node.get_closest_marker("deadline")
    seconds = int(marker.args[0]) if marker else DEFAULT_TEST_DEADLINE_S

    def on_alarm(signum: int, frame: Any) -> None:
        pytest.fail(f"test exceeded its deadline of {seconds}s", pytrace=True)

    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(seconds)
    try:
        yield
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def base_url(server: ServerHandle) -> str:
    return server.base_url


@pytest.fixture(scope="session")
def key_a(server: ServerHandle) -> str:
    return server.key_a


@pytest.fixture(scope="session")
def key_b(server: ServerHandle) -> str:
    return server.key_b


@pytest.fixture(scope="session")
def sdk(base_url: str, key_a: str) -> RunloopSDK:
    return RunloopSDK(base_url=base_url, bearer_token=key_a)


@pytest.fixture(scope="session")
def sdk_b(base_url: str, key_b: str) -> RunloopSDK:
    return RunloopSDK(base_url=base_url, bearer_token=key_b)


@pytest.fixture(scope="session")
def client(base_url: str, key_a: str) -> Runloop:
    return Runloop(base_url=base_url, bearer_token=key_a)


@pytest.fixture(scope="session")
def client_b(base_url: str, key_b: str) -> Runloop:
    return Runloop(base_url=base_url, bearer_token=key_b)


@pytest.fixture(scope="session")
def make_raw(base_url: str) -> Callable[[Optional[str]], RawSession]:
    """Factory: make_raw(key) -> requests.Session bound to the server (key None = no auth header)."""
    sessions: List[RawSession] = []

    def factory(key: Optional[str]) -> RawSession:
        s = RawSession(base_url, key)
        sessions.append(s)
        return s

    yield factory
    for s in sessions:
        s.close()


@pytest.fixture(scope="session")
def raw(make_raw: Callable[[Optional[str]], RawSession], key_a: str) -> RawSession:
    """requests.Session for tenant A; paths may be given as '/v1/...'."""
    return make_raw(key_a)


@pytest.fixture(scope="session")
def raw_b(make_raw: Callable[[Optional[str]], RawSession], key_b: str) -> RawSession:
    return make_raw(key_b)


def _box_name(request: pytest.FixtureRequest, suffix: str = "") -> str:
    base = "e2e-" + request.node.name.replace("[", "-").replace("]", "")
    return (base[:48] + suffix)[:64]


@pytest.fixture
def devbox(sdk: RunloopSDK, request: pytest.FixtureRequest) -> Any:
    """A fresh running devbox (tenant A), shut down after the test."""
    box = sdk.devbox.create(name=_box_name(request))
    try:
        yield box
    finally:
        shutdown_quietly(sdk.api, box.id)


class BoxFactory:
    """Creates devboxes with arbitrary parameters and shuts all of them down afterwards."""

    def __init__(self, sdk: RunloopSDK, request: pytest.FixtureRequest) -> None:
        self._sdk = sdk
        self._request = request
        self._tracked: List[Tuple[Runloop, str]] = []
        self._n = 0

    def create(self, sdk: Optional[RunloopSDK] = None, **params: Any) -> Any:
        """sdk.devbox.create(**params) (waits until running) and track it."""
        sdk = sdk or self._sdk
        self._n += 1
        params.setdefault("name", _box_name(self._request, f"-{self._n}"))
        box = sdk.devbox.create(**params)
        self.track(box.id, sdk.api)
        return box

    def track(self, devbox_id: str, client: Optional[Runloop] = None) -> str:
        self._tracked.append((client or self._sdk.api, devbox_id))
        return devbox_id

    def cleanup(self) -> None:
        for client, devbox_id in reversed(self._tracked):
            shutdown_quietly(client, devbox_id)
        self._tracked.clear()


@pytest.fixture
def box_factory(sdk: RunloopSDK, request: pytest.FixtureRequest) -> Any:
    factory = BoxFactory(sdk, request)
    try:
        yield factory
    finally:
        factory.cleanup()
