#!/bin/bash
# Install the Debian packages a test tier needs, only those missing.
# Usage: tools/apt-deps.sh TIER...   (host: netns and interop tiers; kernel: the VM tier;
# demo: what `make demo` needs)
set -euo pipefail

declare -A TIER_PACKAGES=(
    [host]="iproute2 nftables procps graphviz strongswan-charon strongswan-swanctl libcharon-extra-plugins libstrongswan-extra-plugins libstrongswan-standard-plugins strongswan-pki chromium"
    [kernel]="qemu-system-x86 kmod busybox-static file"
    [demo]="iproute2 procps graphviz strongswan-charon strongswan-swanctl libcharon-extra-plugins libstrongswan-extra-plugins libstrongswan-standard-plugins"
)

wanted=()
for tier in "$@"; do
    [[ -n "${TIER_PACKAGES[$tier]+x}" ]] || { echo "apt-deps: unknown tier '$tier'" >&2; exit 2; }
    for pkg in ${TIER_PACKAGES[$tier]}; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || wanted+=("$pkg")
    done
done
[[ ${#wanted[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]]; then
    echo "apt-deps: need root to install: ${wanted[*]}" >&2
    exit 1
fi
echo "apt-deps: installing ${wanted[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# strongSwan's packages would start charon through systemd/init scripts; nothing
# here runs a service (tests start their own charon), so policy-rc.d forbids it.
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
fi
apt-get install -y -qq --no-install-recommends "${wanted[@]}" >/dev/null
