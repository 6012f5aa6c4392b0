#!/usr/bin/env bash
# Build the C++ engine with sanitizers and run the engine tests under them.
#
#   scripts/sanitize.sh [asan|tsan] [extra pytest arguments...]
#
#   asan (default): AddressSanitizer + UndefinedBehaviorSanitizer over the engine tests (slides, grid,
#                   loader, augmentation, masks, faults, hostile input, CLI, interrupts).
#   tsan:           ThreadSanitizer over the tests that run the thread pools (loader, faults, grid).
#
# Environment: SANITIZE_TESTS (space-separated test files) replaces the default set; PYTHON (default python3) is an interpreter that has the dependencies installed
# (numpy, openslide-python + openslide-bin, pybind11, pytest, hypothesis, ...); BUILD_DIR (default
# build-<mode> in the repository root) holds everything made here. The normal install is never
# touched: the sanitized extension goes into a separate venv (no pip) whose site-packages lists a
# staging folder (python/wsitile's modules, linked, plus the sanitized _core) first and then the
# dependencies' site-packages. A venv, not PYTHONPATH: an editable install's import hook would take
# wsitile._core from the normal build whatever PYTHONPATH says.
#
# The interpreter is not instrumented, so the sanitizer runtime is LD_PRELOADed. Leak detection is
# off (CPython keeps objects alive at exit by design); UBSan halts on the first report.
set -euo pipefail

MODE=${1:-asan}
shift || true
case "$MODE" in
  asan) SANITIZE="address;undefined"; RUNTIME=libasan.so ;;
  tsan) SANITIZE="thread"; RUNTIME=libtsan.so ;;
  *) echo "usage: $0 [asan|tsan] [pytest args...]" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
BUILD=${BUILD_DIR:-$ROOT/build-$MODE}
CXX=${CXX:-g++}
PRELOAD=$("$CXX" -print-file-name="$RUNTIME")
[ -e "$PRELOAD" ] || { echo "$0: $RUNTIME not found (a GCC with sanitizer runtimes is needed)" >&2; exit 2; }
# libstdc++ too: python does not link it, and ASan's __cxa_throw interceptor resolves the real
# function only at start-up ("CHECK failed: real___cxa_throw != 0" at the first C++ throw otherwise).
PRELOAD="$PRELOAD $("$CXX" -print-file-name=libstdc++.so.6)"

# 1. Build the extension (RelWithDebInfo: optimised, with symbols, not stripped).
DEPS=$("$PYTHON" -c 'import os, numpy; print(os.path.dirname(os.path.dirname(numpy.__file__)))')
cmake -S "$ROOT" -B "$BUILD/cmake" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$CXX" \
  -DWSITILE_PYTHON=ON -DWSITILE_SANITIZE="$SANITIZE" \
  -DPython_EXECUTABLE="$(command -v "$PYTHON")" -Dpybind11_DIR="$("$PYTHON" -m pybind11 --cmakedir)" >/dev/null
cmake --build "$BUILD/cmake" -j "${JOBS:-2}"

# 2. Staging package and venv.
PKG="$BUILD/pkg/wsitile"
rm -rf "$BUILD/pkg"
mkdir -p "$PKG"
for f in "$ROOT"/python/wsitile/*; do ln -s "$f" "$PKG/"; done
cp "$BUILD"/cmake/_core*.so "$PKG/"
if [ ! -x "$BUILD/venv/bin/python" ]; then
  "$PYTHON" -m venv --without-pip "$BUILD/venv"
fi
SITE=$("$BUILD/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n%s\n' "$BUILD/pkg" "$DEPS" > "$SITE/00-wsitile-sanitized.pth"
LD_PRELOAD="$PRELOAD" ASAN_OPTIONS=detect_leaks=0 "$BUILD/venv/bin/python" -c "import wsitile._core as c, sys; assert c.__file__.startswith('$PKG'), c.__file__" \
  || { echo "$0: the venv does not import the sanitized extension" >&2; exit 1; }

# 3. Run the tests with the runtime preloaded.
cd "$ROOT"
export PYTHONDONTWRITEBYTECODE=1 JAX_PLATFORMS=cpu
if [ "$MODE" = asan ]; then
  TESTS=(tests/test_slide.py tests/test_grid.py tests/test_loader.py tests/test_loader_augment.py
         tests/test_augment.py tests/test_masks.py tests/test_faults.py tests/test_hostile.py
         tests/test_memory.py tests/test_cli.py tests/test_interrupt.py)
  export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:abort_on_error=0}
  export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
else
  TESTS=(tests/test_loader.py tests/test_loader_augment.py tests/test_faults.py tests/test_grid.py)
  export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1:suppressions=$ROOT/scripts/tsan.supp}
fi
if [ -n "${SANITIZE_TESTS:-}" ]; then read -r -a TESTS <<< "$SANITIZE_TESTS"; fi
echo "== $MODE: LD_PRELOAD=$PRELOAD"
# --capture=sys: a sanitizer report goes to the real stderr (fd capture would lose it with the
# process). -m "not slow": the RSS test measures the allocator, and ASan's quarantine is one by design.
LD_PRELOAD="$PRELOAD" "$BUILD/venv/bin/python" -m pytest -q -p no:cacheprovider --capture=sys -m "not slow" "${TESTS[@]}" "$@"
