#!/usr/bin/env bash
# Fill .whl/ (repository root, ignored by git) with what the GPU machine lacks, for `carry: [".whl"]`:
#
#   - the Python packages its image does not have (cp312, manylinux x86_64; the device README's pip
#     download form), at the versions the smoke runs here used;
#   - wsitile's own cp312 wheel, built here when a Python 3.12 is found (PYTHON312, python3.12, or
#     pyenv's 3.12), with .whl/wsitile.srchash naming the sources it was built from: run_suite.sh
#     installs it only when the sources there hash the same, and otherwise builds on the device
#     (a minute or two of device time). Rerun this script after changing cpp/, python/ or models/.
#
#   bash benchmarks/gpu/fetch_wheels.sh          # prints the wheels and their total size last
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
DEST=.whl
mkdir -p "$DEST"

# Not on the device image (KINDS.md's package list): the engine's readers and writers, the Keras
# baseline and its two missing dependencies. tifffile is there, but at an unknown version: carry
# the tested one (250 kB). flatbuffers (jax.export's serialization, predict's trace cache) is there. scikit-image, scipy, h5py, tqdm, matplotlib, scikit-learn, rich, absl-py,
# ml-dtypes, pillow, numpy are on the image.
PACKAGES=(
  openslide-python==1.4.7
  openslide-bin==4.0.1.2
  imagecodecs==2026.3.6
  tifffile==2026.3.3
  defusedxml==0.7.1
  keras==3.15.1
  namex==0.1.0
  optree==0.20.0
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
MORE=(--platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64
      --platform manylinux_2_35_x86_64)
for pkg in "${PACKAGES[@]}"; do
  name=${pkg%%==*}
  if ls "$DEST" | grep -qi "^$(echo "$name" | tr - _)-${pkg##*==}-"; then continue; fi
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]}" -d "$DEST" "$pkg" \
    || "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]}" "${MORE[@]}" -d "$DEST" "$pkg"
done

# wsitile itself, for CPython 3.12.
PY312=${PYTHON312:-}
if [ -z "$PY312" ]; then
  if command -v python3.12 >/dev/null && python3.12 -c 'pass' 2>/dev/null; then PY312=python3.12
  elif command -v pyenv >/dev/null && pyenv versions --bare | grep -q '^3\.12'; then
    PY312="env PYENV_VERSION=$(pyenv versions --bare | grep '^3\.12' | tail -1) python3.12"
  fi
fi
hash=$(bash benchmarks/gpu/srchash.sh)
if [ -n "$PY312" ]; then
  if [ "$(cat "$DEST/wsitile.srchash" 2>/dev/null)" != "$hash" ] || ! ls "$DEST"/wsitile-*.whl >/dev/null 2>&1; then
    rm -f "$DEST"/wsitile-*.whl "$DEST/wsitile.srchash"
    echo "building wsitile's cp312 wheel with $PY312 (a few minutes on 2 cores)"
    $PY312 -m pip wheel -q --no-deps -w "$DEST" . && echo "$hash" > "$DEST/wsitile.srchash"
    # The device's glibc and libstdc++ must be at least what the extension asks for (if not, the
    # import fails there and run_suite.sh builds from source instead).
    unzip -o -q "$DEST"/wsitile-*.whl 'wsitile/_core*.so' -d /tmp/wsitile-whl-check \
      && for v in GLIBC GLIBCXX; do objdump -T /tmp/wsitile-whl-check/wsitile/_core*.so \
           | grep -o "${v}_[0-9.]*" | sort -uV | tail -1; done | xargs echo "the extension needs at least:"
  fi
else
  echo "no Python 3.12 here: run_suite.sh will build wsitile on the device (1-2 minutes of device time)"
fi

ls -l "$DEST"
echo "total: $(du -ch "$DEST"/*.whl | tail -1 | cut -f1) in $(ls "$DEST"/*.whl | wc -l) wheels (limit: 64 MiB with the repository)"
