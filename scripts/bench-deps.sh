#!/usr/bin/env bash
# Install the tools bench/lab_bench.py needs, when they are missing (called by `make lab-bench`).
#
#   uftp, uftpd                  (uftp) the uftp anchor
#   udp-sender, udp-receiver     (udpcast) the udpcast anchor
#   rsync                        (rsync) the rsync anchor, and the judge of every tree
#   nft                          (nftables) random loss on the targets
#   ethtool                      (ethtool) offloads off in the lab
#   ip, tc                       (iproute2) namespaces, veth pairs, bridge, shaping
#
# Root only (the lab needs root anyway), and only with apt-get.
set -euo pipefail

declare -A package=([uftp]=uftp [uftpd]=uftp [udp-sender]=udpcast [udp-receiver]=udpcast
                   [rsync]=rsync [nft]=nftables [ethtool]=ethtool [ip]=iproute2 [tc]=iproute2)
missing=()
for tool in uftp uftpd udp-sender udp-receiver rsync nft ethtool ip tc; do
    command -v "$tool" >/dev/null 2>&1 && continue
    [[ -x /usr/sbin/$tool || -x /usr/bin/$tool ]] && continue
    [[ " ${missing[*]} " == *" ${package[$tool]} "* ]] || missing+=("${package[$tool]}")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]]; then
    echo "bench-deps: not installed: ${missing[*]}; the lab benchmark needs root, and root" \
        "to install them" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "bench-deps: not installed: ${missing[*]}, and no apt-get to install them" >&2
    exit 1
fi
echo "bench-deps: installing ${missing[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
# Network safety: Debian's uftp package enables and starts a system-wide uftpd (uftp.service,
# /etc/init.d/uftp) that listens on every host interface and writes what it receives to /tmp.
# The benchmark runs its own uftpd inside lab namespaces only, so no service may start during
# the install (policy-rc.d, the Debian way; only when none exists yet), and the one uftp adds
# is disabled afterwards.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# bench-deps: no service starts during this install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
if [[ " ${missing[*]} " == *" uftp "* ]]; then
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now uftp.service >/dev/null 2>&1 || true
    fi
    update-rc.d uftp disable >/dev/null 2>&1 || true
    echo "bench-deps: the system-wide uftpd service of the uftp package is disabled" >&2
fi
