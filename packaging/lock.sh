#!/usr/bin/env bash
# Regenerates requirements.lock and requirements-dev.lock from pyproject.toml (`./dev lock`).
#
# uv resolves pyproject's ranges against the same sources pip installs from on this machine
# (pip's own configuration: its find-links and extra indexes, plus PyPI), with the deliberate
# lock-time pins of packaging/lock-constraints.txt, and writes exact pins with sha256 hashes.
# The current locks are uv's preferences, so a regeneration moves only what pyproject's change
# needs; `./dev lock --upgrade` lets every package move to its newest allowed release.
#   requirements.lock      what `incstream` needs to run (installed by users and check-install)
#   requirements-dev.lock  the same pins plus the test, lint and lock tools (what ./dev installs)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}

sources=(--index-strategy unsafe-best-match)  # like pip: the best match across all sources
for dir in $("$venv/bin/pip" config get global.find-links 2>/dev/null || true) \
           ${PIP_FIND_LINKS:-}; do
  sources+=(--find-links "$dir")
done
for url in $("$venv/bin/pip" config get global.extra-index-url 2>/dev/null || true); do
  sources+=(--extra-index-url "$url")
done

compile() {  # compile OUTPUT [uv args...]
  local out=$1; shift
  "$venv/bin/uv" pip compile pyproject.toml --quiet --generate-hashes --python-version 3.11 \
    --custom-compile-command "./dev lock" -c packaging/lock-constraints.txt "${sources[@]}" \
    -o "$out" "$@"
}
compile requirements.lock "$@"
compile requirements-dev.lock --extra dev -c requirements.lock "$@"
echo "lock: wrote requirements.lock ($(grep -c '^[a-z]' requirements.lock) pins) and" \
     "requirements-dev.lock ($(grep -c '^[a-z]' requirements-dev.lock) pins)" >&2
