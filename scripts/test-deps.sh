#!/usr/bin/env bash
# Install the system tools the tests need, when they are missing (called by `make test`).
#
#   rsync      the end-to-end tests check mrsync's targets with `rsync -anci --delete`
#   ip         (iproute2) brings up lo inside the private network namespace the tests run in
#   unshare    (util-linux) creates that namespace
# and for the network lab of namespaces (tests/netlab, root only):
#   ip         (iproute2) namespaces, veth pairs, a bridge
#   tc         (iproute2) the master's link: rate limit and byte counters
#   nft        (nftables) random loss on the targets
#   ethtool    (ethtool) offloads off, so that each packet crosses the bridge on its own
#   sysctl     (procps) per-namespace settings
#   ssh, sshd  (openssh-client, openssh-server) the real ssh path: sshd on a lab host
#   tmux       (tmux) a terminal to capture mrsync's live progress display in
#
# Only as root and only with apt-get; otherwise say what is missing and carry on (tests that
# need a missing tool skip themselves).
set -euo pipefail

declare -A package=([rsync]=rsync [ip]=iproute2 [tc]=iproute2 [nft]=nftables
                   [ethtool]=ethtool [sysctl]=procps [unshare]=util-linux
                   [ssh]=openssh-client [ssh-keygen]=openssh-client
                   [/usr/sbin/sshd]=openssh-server [tmux]=tmux)
missing=()
for tool in rsync ip tc nft ethtool sysctl unshare ssh ssh-keygen /usr/sbin/sshd tmux; do
    command -v "$tool" >/dev/null 2>&1 && continue
    [[ " ${missing[*]} " == *" ${package[$tool]} "* ]] || missing+=("${package[$tool]}")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "test-deps: installing ${missing[*]} with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "test-deps: not installed: ${missing[*]} (install them as root; tests that need" \
        "them will be skipped)" >&2
fi
