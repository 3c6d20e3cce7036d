#!/usr/bin/env bash
# Start devboxd: install what is missing, build, build the default image (first run), serve.
#   DEVBOXD_LISTEN (default 127.0.0.1:8080), DEVBOXD_DATA_DIR (default /var/lib/devboxd);
#   extra arguments go to `devboxd serve` (e.g. --api-key KEY).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_root "$@"
install_packages "${BASE_PACKAGES[@]}"
build_release
exec "$REPO/target/release/devboxd" serve \
    --listen "${DEVBOXD_LISTEN:-127.0.0.1:8080}" \
    --data-dir "${DEVBOXD_DATA_DIR:-/var/lib/devboxd}" "$@"
