#!/bin/bash
# Extract Debian's libreswan (pluto, whack, addconn) and the libraries it lacks here
# into one private root, for the interop tier's second IKEv2 peer. Not installed: the
# libreswan package conflicts with strongSwan's (../shared/notes/libreswan-peer.md).
# Usage: tools/libreswan-root.sh DIR   (does nothing when DIR already holds pluto)
set -euo pipefail
root=${1:?usage: tools/libreswan-root.sh DIR}
[[ -x "$root/usr/libexec/ipsec/pluto" ]] && exit 0

packages="libreswan libnss3-tools libldns3 libevent-pthreads-2.1-7"
downloads=$(mktemp -d)
trap 'rm -rf "$downloads"' EXIT
chmod 0755 "$downloads"   # apt's _apt user writes the downloads
cd "$downloads"
if ! apt-get download -qq $packages 2>/dev/null; then
    apt-get update -qq
    apt-get download -qq $packages
fi
mkdir -p "$root.part"
for deb in ./*.deb; do
    dpkg-deb -x "$deb" "$root.part"
done
rm -rf "$root"
mv "$root.part" "$root"
echo "libreswan-root: pluto in $root"
