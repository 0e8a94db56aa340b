#!/usr/bin/env bash
# Install the system tools the tests need, when they are missing (called by `make test`).
#
#   rsync      the end-to-end tests check mrsync's targets with `rsync -anci --delete`
#   ip         (iproute2) brings up lo inside the private network namespace the tests run in
#   unshare    (util-linux) creates that namespace
#
# Only as root and only with apt-get; otherwise say what is missing and carry on (tests that
# need a missing tool skip themselves).
set -euo pipefail

declare -A package=([rsync]=rsync [ip]=iproute2 [unshare]=util-linux)
missing=()
for tool in rsync ip unshare; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${package[$tool]}")
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
