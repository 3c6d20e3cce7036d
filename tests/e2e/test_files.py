"""File operations through the official SDK: file.write/read (JSON + text/plain), upload/download."""

from __future__ import annotations

import hashlib
import os

import pytest

from _helpers import describe, expect_api_error


def _sh(devbox, cmd: str) -> str:
    r = devbox.cmd.exec(cmd)
    assert r.exit_code == 0, (cmd, r.exit_code, r.stdout(), r.stderr())
    return r.stdout()


def test_write_read_relative_path_lands_in_home(devbox):
    w = devbox.file.write(file_path="hello.txt", contents="hello world\n")
    assert w.exit_status == 0
    assert devbox.file.read(file_path="hello.txt") == "hello world\n"
    assert devbox.file.read(file_path="/home/user/hello.txt") == "hello world\n"
    assert _sh(devbox, "cat /home/user/hello.txt") == "hello world\n"
    # written as the box user, who can modify it afterwards
    assert _sh(devbox, "stat -c %U /home/user/hello.txt") == "user\n"
    _sh(devbox, "echo more >> hello.txt")
    assert devbox.file.read(file_path="hello.txt") == "hello world\nmore\n"

    # overwrite truncates
    devbox.file.write(file_path="hello.txt", contents="short")
    assert devbox.file.read(file_path="hello.txt") == "short"

    # empty file
    devbox.file.write(file_path="empty.txt", contents="")
    assert devbox.file.read(file_path="empty.txt") == ""
    assert _sh(devbox, "stat -c %s /home/user/empty.txt") == "0\n"


def test_write_absolute_and_nested_paths(devbox):
    devbox.file.write(file_path="/tmp/e2e_abs.txt", contents="abs\n")
    assert _sh(devbox, "cat /tmp/e2e_abs.txt") == "abs\n"
    assert devbox.file.read(file_path="/tmp/e2e_abs.txt") == "abs\n"

    devbox.file.write(file_path="deep/er/still/nested.txt", contents="nested\n")
    assert _sh(devbox, "cat /home/user/deep/er/still/nested.txt") == "nested\n"
    assert devbox.file.read(file_path="deep/er/still/nested.txt") == "nested\n"
    assert _sh(devbox, "stat -c %U /home/user/deep/er") == "user\n"

    devbox.file.write(file_path="/tmp/e2e/a/b/c.txt", contents="c")
    assert _sh(devbox, "cat /tmp/e2e/a/b/c.txt") == "c"


def test_write_read_unicode_and_larger_text(devbox):
    text = "héllo wörld ✓ 日本語 🚀\nzweite Zeile\ttab \"quotes\" \\backslash\n"
    devbox.file.write(file_path="unicode.txt", contents=text)
    assert devbox.file.read(file_path="unicode.txt") == text
    assert _sh(devbox, "wc -c < unicode.txt").strip() == str(len(text.encode("utf-8")))
    expected_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert _sh(devbox, "sha256sum unicode.txt").split()[0] == expected_sha

    big = "".join(f"line {i:07d} {'x' * 80}\n" for i in range(25_000))  # ~2.2 MB of JSON
    devbox.file.write(file_path="big.txt", contents=big)
    assert devbox.file.read(file_path="big.txt") == big
    assert _sh(devbox, "sha256sum big.txt").split()[0] == hashlib.sha256(big.encode()).hexdigest()


@pytest.mark.slow
def test_upload_download_8mib_binary(devbox, tmp_path):
    data = os.urandom(8 * 1024 * 1024 + 4099)
    digest = hashlib.sha256(data).hexdigest()
    local = tmp_path / "blob.bin"
    local.write_bytes(data)

    devbox.file.upload(path="blob.bin", file=local)
    out = _sh(devbox, "sha256sum /home/user/blob.bin; stat -c %s /home/user/blob.bin")
    sha_line, size_line = out.splitlines()
    assert sha_line.split()[0] == digest
    assert int(size_line) == len(data)

    got = devbox.file.download(path="blob.bin")
    assert isinstance(got, bytes)
    assert len(got) == len(data)
    assert hashlib.sha256(got).hexdigest() == digest  # byte-for-byte (avoid dumping 8 MiB on failure)

    got = devbox.file.download(path="/home/user/blob.bin")
    assert hashlib.sha256(got).hexdigest() == digest

    # tuple form, absolute path, nested directories created
    small = bytes(range(256)) * 3
    devbox.file.upload(path="/tmp/up/nested/small.bin", file=("small.bin", small))
    assert devbox.file.download(path="/tmp/up/nested/small.bin") == small
    assert _sh(devbox, "sha256sum /tmp/up/nested/small.bin").split()[0] == hashlib.sha256(small).hexdigest()


def test_missing_file_is_a_client_error(devbox, raw):
    expect_api_error(lambda: devbox.file.read(file_path="does/not/exist.txt"))
    expect_api_error(lambda: devbox.file.download(path="/nope/missing.bin"))

    r = raw.post(f"/v1/devboxes/{devbox.id}/read_file_contents", json={"file_path": "missing.txt"})
    assert 400 <= r.status_code < 500, describe(r)
    r = raw.post(f"/v1/devboxes/{devbox.id}/download_file", json={"path": "missing.bin"})
    assert 400 <= r.status_code < 500, describe(r)


def test_read_file_contents_is_text_plain(devbox, raw):
    devbox.file.write(file_path="plain.txt", contents='{"not": "json-encoded"}\n')
    r = raw.post(
        f"/v1/devboxes/{devbox.id}/read_file_contents",
        json={"file_path": "plain.txt"},
        headers={"Accept": "text/plain"},
    )
    assert r.status_code == 200, describe(r)
    assert r.headers["content-type"].startswith("text/plain"), describe(r)
    assert r.content == b'{"not": "json-encoded"}\n'

    r = raw.post(
        f"/v1/devboxes/{devbox.id}/download_file",
        json={"path": "plain.txt"},
        headers={"Accept": "application/octet-stream"},
    )
    assert r.status_code == 200, describe(r)
    assert r.headers["content-type"].startswith("application/octet-stream"), describe(r)
    assert r.content == b'{"not": "json-encoded"}\n'
