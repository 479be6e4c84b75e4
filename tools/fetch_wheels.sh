#!/usr/bin/env bash
# Download the pure-Python wheels that tools/gpu_check.sh installs on a GPU machine without a package
# registry: torch-pruning and jsonargparse (+ its `signatures` extras), and pytest + hypothesis (with their
# pure-Python deps) in case the image lacks them; pinned to this machine's versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-/work/venv/bin/python}
[ -x "$PY" ] || PY=python3
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"; }
JA=$(ver jsonargparse 4.53.0)
DP=$(ver docstring_parser 0.18.0)
TC=$(ver typeshed_client 2.15.0)
mkdir -p wheels
PKGS=("torch-pruning==1.6.1" "jsonargparse==$JA" "docstring-parser==$DP" "typeshed-client==$TC"
  "pytest==$(ver pytest 9.2.0)" "pluggy==$(ver pluggy 1.7.0)" "iniconfig==$(ver iniconfig 2.3.1)"
  "pygments==$(ver pygments 2.19.2)" "hypothesis==$(ver hypothesis 6.170.17)"
  "sortedcontainers==$(ver sortedcontainers 2.4.0)")
# For this machine, and for the GPU image (CPython 3.12, x86_64): hypothesis ships compiled wheels.
"$PY" -m pip download --no-deps --only-binary=:all: -d wheels "${PKGS[@]}"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d wheels "${PKGS[@]}"
ls -l wheels
