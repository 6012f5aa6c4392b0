#!/usr/bin/env bash
# A hash of the sources wsitile's wheel is built from (run from the repository root). Uses only
# find/sort/cat/sha256sum, since the device machine's copy of the tree has no .git.
set -euo pipefail
find cpp python models CMakeLists.txt pyproject.toml -type f \
    \( -name '*.cpp' -o -name '*.hpp' -o -name '*.py' -o -name '*.pyi' -o -name 'py.typed' \
       -o -name 'CMakeLists.txt' -o -name 'pyproject.toml' \) -not -path '*/__pycache__/*' -print0 \
  | LC_ALL=C sort -z | xargs -0 cat | sha256sum | cut -c1-16
