"""Starting and stopping devboxd processes (used by conftest's session server and by tests
that need a private server they may crash and restart, e.g. test_exec_durable.py)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
LOG_SECTION_MAX_LINES = 300
STOP_GRACE_S = 10.0


class ServerStartError(Exception):
    """devboxd exited early or did not become healthy in time (message includes the log tail)."""


@dataclass
class ServerHandle:
    base_url: str
    key_a: str
    key_b: str
    proc: Optional[subprocess.Popen] = None
    data_dir: Optional[Path] = None
    log_path: Optional[Path] = None
    _log_file: Any = field(default=None, repr=False)

    def log_size(self) -> int:
        if self.log_path is None:
            return 0
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def read_log(self, start: int = 0, max_lines: int = LOG_SECTION_MAX_LINES) -> str:
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                data = f.read()
        except OSError as e:
            return f"<cannot read {self.log_path}: {e}>"
        lines = data.decode("utf-8", "replace").splitlines()
        if len(lines) > max_lines:
            lines = [f"... ({len(lines) - max_lines} earlier lines omitted)"] + lines[-max_lines:]
        return "\n".join(lines)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_key(tag: str) -> str:
    return f"e2e-key-{tag}-" + secrets.token_hex(12)


def mounts_under(path: Path) -> List[str]:
    """Mount points (in our mount namespace) at or below `path`."""
    prefix = str(path.resolve())
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 4:
                    mp = parts[4].replace("\\040", " ")
                    if mp == prefix or mp.startswith(prefix + "/"):
                        found.append(mp)
    except OSError:
        pass
    return found


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after STOP_GRACE_S. Only the server process itself is signalled."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def binary_path() -> Path:
    return Path(os.environ.get("DEVBOXD_BIN", REPO_ROOT / "target" / "release" / "devboxd"))


def image_dir() -> Path:
    return Path(os.environ.get("DEVBOXD_IMAGE_DIR", REPO_ROOT / "target" / "images"))


def server_command(port: int, data_dir: Path, keys: Sequence[str]) -> List[str]:
    """The exact command line the e2e servers run with."""
    cmd = [
        str(binary_path()),
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(data_dir),
        "--image-dir",
        str(image_dir()),
    ]
    for k in keys:
        cmd += ["--api-key", k]
    return cmd


def spawn(handle: ServerHandle, port: int) -> None:
    """Start devboxd for `handle` (its data_dir, log_path and keys) on `port`; sets handle.proc."""
    assert handle.data_dir is not None and handle.log_path is not None
    cmd = server_command(port, handle.data_dir, [handle.key_a, handle.key_b])
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    env.setdefault("RUST_BACKTRACE", "1")
    if handle._log_file is None:
        handle._log_file = open(handle.log_path, "ab", buffering=0)
    handle._log_file.write(f"# e2e: starting {' '.join(cmd[:8])} ... (keys redacted)\n".encode())
    handle.proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=handle._log_file,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    handle.base_url = f"http://127.0.0.1:{port}"


def wait_healthy(handle: ServerHandle, timeout: float) -> None:
    """Poll GET /healthz until 200; raise ServerStartError if the process exits or time runs out."""
    assert handle.proc is not None
    deadline = time.monotonic() + timeout
    last_err = "no attempt yet"
    while True:
        rc = handle.proc.poll()
        if rc is not None:
            raise ServerStartError(
                f"devboxd exited with code {rc} before becoming healthy; log {handle.log_path}:\n"
                f"{handle.read_log(0, 200)}"
            )
        try:
            r = requests.get(handle.base_url + "/healthz", timeout=2)
            if r.status_code == 200:
                return
            last_err = f"HTTP {r.status_code}: {r.text[:200]}"
        except requests.RequestException as e:
            last_err = repr(e)
        if time.monotonic() > deadline:
            stop_process(handle.proc)
            raise ServerStartError(
                f"devboxd not healthy after {timeout:.0f}s (last: {last_err}); log {handle.log_path}:\n"
                f"{handle.read_log(0, 200)}"
            )
        time.sleep(0.2)


# Other server logs a test wants attached to its failure report (conftest's makereport hook
# reads this from item.stash): a list of (title, ServerHandle, start offset).
EXTRA_LOGS_KEY = pytest.StashKey[list]()


class PrivateServer:
    """A devboxd of one test's own (same binary, image dir and flags as the session server), on
    a fresh data dir, that the test may crash (SIGKILL) and restart on the same data dir and port.

    `stop()` shuts down every devbox it still has (through the API), stops the process and
    removes the data dir unless `keep` is set or mounts are left below it (then it says so).
    """

    def __init__(self, prefix: str = "devboxd-e2e-private-") -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        data_dir = self.tmp / "data"
        data_dir.mkdir()
        self.handle = ServerHandle(
            base_url="",
            key_a=new_key("pa"),
            key_b=new_key("pb"),
            data_dir=data_dir,
            log_path=self.tmp / "devboxd.log",
        )
        self.port = free_port()
        self.starts = 0

    @property
    def base_url(self) -> str:
        return self.handle.base_url

    @property
    def key(self) -> str:
        return self.handle.key_a

    @property
    def proc(self) -> Optional[subprocess.Popen]:
        return self.handle.proc

    def start(self, timeout: float = 120.0) -> None:
        """Start (or restart) the server on the same data dir and port; wait until healthy."""
        assert self.handle.proc is None or self.handle.proc.poll() is not None, "server still running"
        deadline = time.monotonic() + timeout
        while True:
            spawn(self.handle, self.port)
            self.starts += 1
            try:
                wait_healthy(self.handle, max(5.0, deadline - time.monotonic()))
                return
            except ServerStartError:
                # The port can briefly be unavailable after a crash; retry while time is left.
                if time.monotonic() > deadline or "in use" not in self.handle.read_log(0).lower():
                    raise
                time.sleep(0.5)

    def crash(self) -> None:
        """SIGKILL the server process (only it: boxes live in their own cgroups) and reap it."""
        proc = self.handle.proc
        assert proc is not None and proc.poll() is None, "server is not running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self, *, keep: bool = False) -> List[str]:
        """Shut down remaining boxes, stop the server, clean up. Returns notes for the report."""
        notes: List[str] = []
        proc = self.handle.proc
        if proc is not None and proc.poll() is None:
            try:
                s = requests.Session()
                s.headers["Authorization"] = f"Bearer {self.key}"
                r = s.get(self.base_url + "/v1/devboxes", params={"limit": 500}, timeout=30)
                for d in r.json().get("devboxes", []):
                    if d.get("status") not in ("shutdown", "failure"):
                        s.post(f"{self.base_url}/v1/devboxes/{d['id']}/shutdown", timeout=60)
            except Exception as e:  # best effort
                notes.append(f"private server {self.base_url}: could not shut down its devboxes: {e!r}")
            stop_process(proc)
        if self.handle._log_file is not None:
            self.handle._log_file.close()
            self.handle._log_file = None
        if keep:
            notes.append(f"kept private devboxd data dir and log in {self.tmp}")
            return notes
        leftover = mounts_under(self.tmp)
        if leftover:
            notes.append(f"NOT removing {self.tmp}: mounts still present below it: {leftover}")
            return notes
        shutil.rmtree(self.tmp, ignore_errors=True)
        return notes
