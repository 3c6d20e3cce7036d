#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and runtime integration tests (real
# namespaces and cgroups), and end-to-end tests with the official Runloop Python SDK.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_root "$@"
# tmux: the terminal tests drive `devboxd shell` in a real terminal. Node and npm run the
# TypeScript SDK tests (the machine's own Node is used when there is one).
install_packages "${BASE_PACKAGES[@]}" python3 python3-venv tmux
command -v npm >/dev/null || install_packages nodejs npm
start=$(date +%s)

echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check

echo "==> cargo clippy -D warnings" >&2
cargo clippy --release --locked --workspace --all-targets -- -D warnings

build_release
export DEVBOXD_IMAGE_DIR="$REPO/target/images"
echo "==> default image" >&2
"$REPO/target/release/devboxd" image build --data-dir "$REPO/target/devboxd-data" --image-dir "$DEVBOXD_IMAGE_DIR"

echo "==> cargo test (unit + runtime integration)" >&2
cargo test --release --locked --workspace

echo "==> end-to-end tests: runloop-api-client 3.0.0 and 2.0.0 (PyPI), @runloop/api-client 1.32 (npm)" >&2
VENV="$REPO/target/e2e-venv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -r tests/e2e/requirements.txt
DEVBOXD_BIN="$REPO/target/release/devboxd" "$VENV/bin/python" -m pytest tests/e2e -q -p no:cacheprovider

echo "==> all tests passed in $(( $(date +%s) - start )) s" >&2
