#!/bin/bash
# Set up the real-kernel VM tier (../shared/notes/vm-tier.md): Debian's stock kernel
# unpacked (not installed) into .cache/vm/kernel, and virtme-ng in its own venv.
# Idempotent: a second run finds everything in place and does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=.cache/vm
mkdir -p "$CACHE"

tools/apt-deps.sh kernel

if [[ ! -f $CACHE/kernel/.ready ]]; then
    # The metapackage names the current versioned image; never pin that name, old
    # versions leave the mirror.
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [[ -n $pkg ]] || { apt-get update -qq; pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'); }
    [[ -n $pkg ]] || { echo "vm-setup: cannot resolve linux-image-amd64" >&2; exit 1; }
    rm -rf "$CACHE/kernel" "$CACHE/deb"
    mkdir -p "$CACHE/deb" "$CACHE/kernel"
    (cd "$CACHE/deb" && apt-get download -qq "$pkg")
    dpkg-deb -x "$CACHE"/deb/*.deb "$CACHE/kernel"
    kver=${pkg#linux-image-}
    depmod -b "$CACHE/kernel" "$kver"
    echo "$kver" > "$CACHE/kernel/.ready"
    rm -rf "$CACHE/deb"
fi

if [[ ! -x $CACHE/vng/bin/vng ]]; then
    python3 -m venv "$CACHE/vng"
    "$CACHE/vng/bin/pip" install --quiet "virtme-ng>=1.42"
fi
echo "vm-setup: kernel $(cat $CACHE/kernel/.ready), $($CACHE/vng/bin/vng --version 2>&1 | head -1)"
