#!/usr/bin/env bash
# The GPU measurements as one prepared call of a GPU machine (the default steps: about 8 min on an
# H200): the GPU-only tests, the pipeline benchmark (bench/pipeline.py) and the attention capture
# benchmark (bench/attention.py), each step with its own timeout so that one that hangs leaves
# the others' results. Output: one file per step in $OUT (or outputs/gpu). A machine without
# diffusers and a package index: run `bash bench/gpu_wheels.sh` first where they are installed
# (it puts their wheels in .whl/, ignored by git) and bring .whl along; they are installed into
# /tmp/site. Arguments: the steps to run, e.g. `bash bench/gpu.sh tests pipeline`; default:
# tests pipeline_quick attention.
set -u
export PYTHONUNBUFFERED=1
out="${OUT:-outputs/gpu}"
mkdir -p "$out"
py=$(command -v python3 || command -v python)
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl -q 2>&1 |
    grep -v WARNING
  export PYTHONPATH="/tmp/site:$PWD"
fi
"$py" -c "import diffusers, peft" ||
  { echo "no diffusers or peft: run bench/gpu_wheels.sh here and carry .whl"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
only=" ${*:-tests pipeline_quick attention} "
step() {  # step NAME SECONDS COMMAND...: run, keep the output, print its tail
  local name=$1 secs=$2; shift 2
  [[ "$only" == *" $name "* ]] || return 0
  timeout "$secs" "$@" >"$out/$name.txt" 2>&1
  echo "## $name: exit $?"; grep -v '^\[transformers\]\|^There are modules' "$out/$name.txt" | tail -30
}
step tests 100 "$py" -m pytest -q -p no:cacheprovider tests/test_pipeline.py tests/test_attention.py -k "gpu or cuda"
step pipeline 240 "$py" bench/pipeline.py --backend sd15-random --images 8 --reps 2
step pipeline_quick 100 "$py" bench/pipeline.py --backend sd15-random --images 8 --reps 1 --no-memory
step pipeline_hidden 110 "$py" bench/pipeline.py --backend sd15-random --images 8 --reps 1 --no-memory --kv-store hidden
step attention 90 "$py" bench/attention.py --backend sd15
step profile 120 "$py" bench/pipeline.py --backend sd15-random --images 2 --steps 5 --profile torch --profile-top 15
