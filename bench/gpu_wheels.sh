#!/usr/bin/env bash
# For a GPU machine that has torch, transformers, peft and accelerate but no diffusers and no
# package index: run this where the package is installed, before bench/gpu.sh runs there. It
# downloads into .whl/ (ignored by git) the diffusers and peft wheels of the versions this
# checkout's environment runs, for Python 3.12; bring .whl/ along and gpu.sh installs them:
#
#     bash bench/gpu_wheels.sh                  # here
#     bash bench/gpu.sh tests pipeline          # there, with .whl/ in the working tree
#
# Both are pure Python (py3-none-any wheels), about 7 MB together.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=$(command -v python3)
version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
rm -f .whl/diffusers-*.whl .whl/peft-*.whl  # one version of each, or the install stops
for pkg in diffusers peft; do
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform any --platform manylinux2014_x86_64 \
    -d .whl "$pkg==$(version "$pkg")" 2>&1 | { grep -v '^WARNING: Location' || true; }
  compgen -G ".whl/$pkg-*.whl" >/dev/null || { echo "no $pkg wheel in .whl/" >&2; exit 1; }
done
ls -l .whl/*.whl
