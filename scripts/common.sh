# Shared by serve.sh and test.sh: become root, install missing Debian packages, build.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "devboxd needs root (namespaces, overlayfs, cgroups); re-running with sudo" >&2
        exec sudo -E "$0" "$@"
    fi
}

# install_packages PKG...: apt-get install the ones that are not installed yet.
install_packages() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "==> installing Debian packages: ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    fi
}

# Runtime needs: mmdebstrap builds the base image; e2fsprogs formats per-box disks; gcc builds
# the bundled SQLite.
BASE_PACKAGES=(mmdebstrap arch-test ca-certificates e2fsprogs util-linux gcc libc6-dev pkg-config)

build_release() {
    echo "==> cargo build --release (the first build takes a few minutes)" >&2
    cargo build --release --locked -p devboxd >&2
}
