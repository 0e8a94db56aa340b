#!/usr/bin/env bash
# `make demo`: sync a sample tree to three local targets over multicast (pinned to loopback,
# TTL 0: no packet leaves the machine), check the result with rsync when it is installed, then
# sync again to show that up-to-date targets cost nothing.
#
#   scripts/demo.sh [VENV_DIR]      (run from the repository root)
set -euo pipefail

venv=${1:-.venv}
mrsync=$venv/bin/mrsync
python=$venv/bin/python
targets=(demo/t1 demo/t2 demo/t3)

step() { printf '\n==> %s\n' "$*"; }

if [[ ! -d demo/src ]]; then
    step "building the sample tree demo/src"
    mkdir -p demo
    "$python" scripts/make_demo_tree.py demo/src
fi

step "removing old targets: ${targets[*]}"
rm -rf "${targets[@]}"

step "$mrsync -v 1 demo/src/ ${targets[*]}"
rc=0
"$mrsync" -v 1 demo/src/ "${targets[@]}" || rc=$?
if [[ $rc -ne 0 ]]; then
    echo "demo: mrsync exited with status $rc" >&2
    exit "$rc"
fi

if command -v rsync >/dev/null 2>&1; then
    step "checking every target with rsync -anci --delete (content checksums, metadata)"
    bad=0
    for t in "${targets[@]}"; do
        if ! diffs=$(rsync -anci --delete demo/src/ "$t/" 2>&1); then
            echo "$t: rsync could not compare it:"
            printf '%s\n' "$diffs" | sed 's/^/    /'
            bad=1
        elif [[ -z $diffs ]]; then
            echo "$t identical"
        else
            echo "$t DIFFERS from demo/src:"
            printf '%s\n' "$diffs" | sed 's/^/    /'
            bad=1
        fi
    done
    if [[ $bad -ne 0 ]]; then
        echo "demo: some targets differ from the source" >&2
        exit 1
    fi
else
    step "rsync is not installed: skipping the independent check of the targets"
fi

step "again, now that the targets are up to date (nothing should be sent)"
rc=0
"$mrsync" -v 1 demo/src/ "${targets[@]}" || rc=$?
if [[ $rc -ne 0 ]]; then
    echo "demo: the second mrsync exited with status $rc" >&2
    exit "$rc"
fi
printf '\ndemo: done (mrsync exited 0 both times)\n'
