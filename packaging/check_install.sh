#!/usr/bin/env bash
# `./dev check-install` (CI runs it): incstream as a user installs it, proven in a fresh venv in a
# temporary directory outside the repo.
#   1. pip installs requirements.lock (exact pins, sha256-checked, the CPU torch);
#   2. `pip install <repo>` resolves pyproject's ranges against that and must add incstream only;
#   3. `pip check` passes; site-packages gained only `incstream` and its dist-info (no top-level
#      engine/, state/, pipeline/);
#   4. `incstream demo` passes from another directory, with no INCSTREAM_* or HF_* variables set,
#      the data directory at its default (the user data dir, pointed into the temp dir through
#      XDG_DATA_HOME), and nothing under site-packages changes (every file hashed before and
#      after), and its temporary directory is gone afterwards.
# The temp dir is removed at the end; KEEP=1 keeps it. Each step's seconds are printed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
work=$(mktemp -d "${TMPDIR:-/tmp}/incstream-check-install.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT
case "$work/" in "$repo"/*) echo "check-install: $work is inside the repo" >&2; exit 1 ;; esac
t0=$SECONDS
step() { echo "check-install: [$((SECONDS - t0)) s] $*" >&2; }
fail() { echo "check-install: FAILED: $*" >&2; exit 1; }
quiet_pip() { grep -v "is ignored: it is neither" >&2 || true; }  # this machine's mirror notes

# What a user has: none of ./dev's variables (INCSTREAM_HOME points into the checkout there).
for name in $(env | grep -o '^\(INCSTREAM\|HF\|TRANSFORMERS\)_[A-Z_]*' || true); do
  unset "$name"
done

step "fresh venv in $work"
"$python" -m venv "$work/venv"
pip="$work/venv/bin/pip"
site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

step "pip install --require-hashes -r requirements.lock"
"$pip" install -q --require-hashes -r "$repo/requirements.lock" 2> >(quiet_pip)
"$pip" freeze --all | sort > "$work/freeze-before"
ls "$site" | sort > "$work/site-before"

# A copy of the working tree (tracked and untracked, not ignored): pip builds a source tree in
# place, and the repo must not gain build/ or egg-info from a check.
mkdir "$work/src"
(cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$work/src")
step "pip install <repo> (a copy of the working tree)"
"$pip" install -q "$work/src" 2> >(quiet_pip)

"$pip" freeze --all | sort > "$work/freeze-after"
added=$(comm -13 "$work/freeze-before" "$work/freeze-after" | sed 's/ @ .*//; s/==.*//')
changed=$(comm -23 "$work/freeze-before" "$work/freeze-after")
[ "$added" = incstream ] && [ -z "$changed" ] \
  || fail "pip install <repo> changed more than incstream: added [$added] replaced [$changed]"

step "pip check"
"$pip" check || fail "pip check"

ls "$site" | sort > "$work/site-after"
new=$(comm -13 "$work/site-before" "$work/site-after" | tr '\n' ' ')
[ "$new" = "incstream incstream-0.1.0.dist-info " ] \
  || fail "site-packages gained [$new], expected only incstream and its dist-info"

hash_site() { (cd "$site" && find . -type f -print0 | sort -z | xargs -0 sha256sum) > "$1"; }
hash_site "$work/site-hashes-before"
mkdir "$work/elsewhere" "$work/xdg" "$work/tmp"
step "incstream demo, from $work/elsewhere"
(cd "$work/elsewhere" && XDG_DATA_HOME="$work/xdg" TMPDIR="$work/tmp" \
   "$work/venv/bin/incstream" demo --quiet) || fail "incstream demo"
hash_site "$work/site-hashes-after"
diff "$work/site-hashes-before" "$work/site-hashes-after" >&2 \
  || fail "the demo changed files under site-packages (diff above)"
# (torch keeps its own compile cache, torchinductor_<user>, in the temp dir: not ours)
left=$(ls -A "$work/tmp" | grep -v '^torchinductor_' || true)
[ -z "$left" ] || fail "the demo left $left in the temp dir"
[ -z "$(ls -A "$work/elsewhere")" ] || fail "the demo wrote $(ls "$work/elsewhere") into the cwd"
# The installed package carries its C kernels' sources and the worker built them into the user
# data dir (engine/c_kernels.py): the fast mode's held attention runs on every CPU with a compiler.
if command -v "${CC:-cc}" >/dev/null; then
  ls "$work/xdg/incstream/cache/kernels"/held_attention-*.so >/dev/null 2>&1 \
    || fail "the demo's worker did not build the held-attention kernel from the installed package"
fi

step "OK: fresh venv, pip install, pip check, demo; site-packages unchanged"
