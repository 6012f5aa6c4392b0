#!/usr/bin/env bash
# One device call of the GPU suite (issue 6): install the carried wheels, make wsitile importable,
# run one part, tee everything into $OUT/PART.log. The part's table is the last thing printed.
#
#   bash benchmarks/gpu/run_suite.sh steps|loader|inference [arguments for that script]
#   bash benchmarks/gpu/run_suite.sh next     # README.md's "The next run", all of it in one call
#
# Environment: SUITE_SECONDS (default 465; 570 for next): the whole call's budget; the part gets what the install
# left (pass --budget to override). PYTHON (default python3). SITE (default /tmp/site): where the
# wheels go (PYTHONPATH; the image's own site-packages stay untouched).
set -uo pipefail
PART=${1:-}
case "$PART" in
  steps|loader|inference) shift ;;
  next) shift; [ $# -eq 0 ] || { echo "$0 next takes no arguments" >&2; exit 2; } ;;
  *) echo "usage: $0 steps|loader|inference [args...] | next" >&2; exit 2 ;;
esac
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
export PYTHONUNBUFFERED=1 KERAS_BACKEND=jax
if [ -n "${OUT:-}" ]; then LOG="$OUT/$PART.log"; else LOG="/tmp/wsitile-gpu-$PART.log"; fi

# README.md's "The next run" in one call (the first run's 15 minutes of device time held three calls only
# with their lowest rows cut; one call saves two installs and two transfers). Parts in priority order,
# each given its share of what is left, so seconds a part does not use go to the ones after it:
#   1. the 299 px loader scaling (deliverable 3's missed 80%);
#   2. predict's seed settings, empty and filled compilation cache, 3 slides in one process, --tta
#      (deliverable 4's 10 s; Liu et al.'s setting met its 2 minutes by 32 s and is left out);
#   3. where the train step's time goes (299 px first: the 1.24x over Keras is the thin margin),
#      then the seed's partially frozen step (deliverable 1's extra figure).
# SUITE_SMOKE=1 passes --smoke to each part: the whole call (install, build, parts) on a CPU.
next_run() {
  local end=$(( ${SUITE_SECONDS:-570} - 5 )) rc=0 smoke=()
  [ -n "${SUITE_SMOKE:-}" ] && smoke=(--smoke)
  echo "== next: loader 299 px ($(( (end - SECONDS) * 28 / 100 )) s)"
  "$PY" -m benchmarks.gpu.loader "${smoke[@]}" --budget $(( (end - SECONDS) * 28 / 100 )) --sides 299 --no-e2e || rc=1
  echo "== next: inference ($(( (end - SECONDS) * 58 / 100 )) s)"
  "$PY" -m benchmarks.gpu.inference "${smoke[@]}" --budget $(( (end - SECONDS) * 58 / 100 )) --runs cold warm three tta || rc=1
  echo "== next: steps ($(( end - SECONDS )) s)"
  "$PY" -m benchmarks.gpu.steps "${smoke[@]}" --budget $(( end - SECONDS )) --groups wsitile-study wsitile-frozen --sides 299 80 || rc=1
  return $rc
}

suite() {
echo "== $PART: $(date -u +%FT%TZ); $(nvidia-smi -L 2>/dev/null | head -1 || echo 'no nvidia-smi'); $(nproc) cores"
# Whether the cores are hardware threads decides what parallel efficiency can reach (BENCHMARKS.md).
lscpu 2>/dev/null | grep -E '^(Model name|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\)|NUMA node\(s\)|CPU max MHz|L3 cache):' \
  | sed 's/  */ /g' | paste -sd ';' | sed 's/^/cpu: /'

# 1. The carried wheels, except wsitile's own (step 2 decides about that one).
shopt -s nullglob
wheels=()
for w in .whl/*.whl; do [[ $(basename "$w") == wsitile-* ]] || wheels+=("$w"); done
if [ ${#wheels[@]} -eq 0 ]; then echo "no wheels in .whl/: run benchmarks/gpu/fetch_wheels.sh here and carry .whl"; return 1; fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" || return 1
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# 2. wsitile: the carried wheel when it was built from exactly these sources, else build it here
#    (the image has pybind11, scikit-build-core and CMake) and hand the wheel back through $OUT, so
#    that the next call can carry it.
hash=$(bash benchmarks/gpu/srchash.sh)
carried=(.whl/wsitile-*.whl)
if [ ${#carried[@]} -eq 1 ] && [ "$(cat .whl/wsitile.srchash 2>/dev/null)" = "$hash" ] \
   && "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${carried[0]}" \
   && "$PY" -c 'import wsitile._core' 2>/dev/null; then
  echo "wsitile: carried wheel $(basename "${carried[0]}") (sources $hash)"
else
  echo "wsitile: building from source here (no carried wheel for sources $hash, or it did not import)"
  rm -rf /tmp/wsitile-wheel
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PY" -m pip wheel -q --no-build-isolation --no-deps -w /tmp/wsitile-wheel . || return 1
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" /tmp/wsitile-wheel/wsitile-*.whl || return 1
  if [ -n "${OUT:-}" ]; then cp /tmp/wsitile-wheel/wsitile-*.whl "$OUT/" && echo "$hash" > "$OUT/wsitile.srchash"; fi
fi
"$PY" - <<'EOF' || return 1
from importlib.metadata import PackageNotFoundError, version
import wsitile, openslide, imagecodecs, tifffile

def v(p):
    try:
        return version(p)
    except PackageNotFoundError:
        return "missing"

print("versions:", ", ".join(f"{p} {v(p)}" for p in (
    "wsitile", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "keras", "torch", "torchvision",
    "openslide-python", "openslide-bin", "imagecodecs", "tifffile", "numpy")), "; openslide", openslide.__library_version__,
    "; augmentation kernel", wsitile._core.augment_kernel_isa())
EOF

# 3. The part, with what is left of the budget.
[ "$PART" = next ] && { next_run; return; }
left=$(( ${SUITE_SECONDS:-465} - SECONDS - 5 ))
budget=(--budget "$left")
for a in "$@"; do [ "$a" = --budget ] && budget=(); done
echo "== running benchmarks.gpu.$PART (${left} s left)"
"$PY" -m "benchmarks.gpu.$PART" "${budget[@]}" "$@"
}

# A pipeline, not `exec > >(tee ...)`: the call returns only after tee has written the table.
suite "$@" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
