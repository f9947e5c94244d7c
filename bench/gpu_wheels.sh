#!/usr/bin/env bash
# Run HERE (not on the device) before a device call of bench/gpu.sh: the lent GPU machines' image
# has torch, transformers, peft and accelerate but no diffusers (/work/.library/device/KINDS.md),
# and it cannot reach a package index. This downloads, into .whl/ (ignored by git), the wheels
# of the versions this checkout's environment runs, for the device's Python (3.12):
#
#     bash bench/gpu_wheels.sh        # here, once per machine (.whl/ is not committed)
#     # then the device call, carrying .whl (gpu.sh installs it into /tmp/site):
#     #   run(command="bash bench/gpu.sh tests pipeline mixed_rows switch", carry=[".whl"])
#
# diffusers and peft are pure Python (py3-none-any wheels), about 7 MB together; the call's
# working tree may carry 64 MiB.
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
