#!/usr/bin/env bash
# Issue 6's GPU checks as one prepared call of a lent GPU machine (the default steps: about 8 min on an H200):
# the GPU-only tests, the full pipeline benchmark, a UNet call's cost by its rows (bench/rows.py),
# the waits for the GPU per case (bench/syncs.py), the pipeline and capture
# benchmarks, the per-stage breakdowns (bench/stage1.py, bench/stage2.py; bench/README.md), and a torch.profiler
# run of the batched and cached full method (top entries by CPU and by GPU time). Each step has
# its own timeout, so one that hangs leaves the others' results. Output: one file per step in
# $OUT (or outputs/gpu). The lent machines have no diffusers: run `bash bench/gpu_wheels.sh`
# here first (it puts this environment's diffusers and peft wheels in .whl/, ignored by git) and
# carry .whl in the device call; they are installed into /tmp/site. Arguments: the steps to
# run, e.g. `bash bench/gpu.sh stage1 profile`; default: the ones that fit one call's 600 s
# together (tests syncs stage1 stage2 pipeline_quick attention).
# Next call (session 24's plan, about 490 s): `bash bench/gpu.sh tests pipeline mixed_rows switch`
# with carry [".whl"]
# (mixed_rows: the inversion's row riding a vanilla call against its call of its own, and 16
# against 17 rows, which rows.py also measures; with the LoRA merged, as `generate` runs it, also
# the riding row through the merged weights against the B A x update (session 26); switch: what a
# call spends switching modes and attention processors, now against before session 24).
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
only=" ${*:-tests syncs stage1 stage2 pipeline_quick attention} "
step() {  # step NAME SECONDS COMMAND...: run, keep the output, print its tail
  local name=$1 secs=$2; shift 2
  [[ "$only" == *" $name "* ]] || return 0
  timeout "$secs" "$@" >"$out/$name.txt" 2>&1
  echo "## $name: exit $?"; grep -v '^\[transformers\]\|^There are modules' "$out/$name.txt" | tail -30
}
step tests 100 "$py" -m pytest -q -p no:cacheprovider tests/test_pipeline.py tests/test_attention.py -k "gpu or cuda"
step pipeline 240 "$py" bench/pipeline.py --backend sd15-random --images 8 --reps 2
step rows 60 "$py" bench/rows.py
step mixed_rows 75 "$py" bench/mixed_rows.py --backend sd15-random --fuse-lora
step switch 90 "$py" bench/switch.py --backend sd15-random
step syncs 90 "$py" bench/syncs.py --backend sd15-random --steps 10 --images 2
step stage1 170 "$py" bench/stage1.py --backend sd15-random --images 8 --reps 3
step stage2 170 "$py" bench/stage2.py --backend sd15-random --images 8 --reps 2 --profile-steps 10
step pipeline_quick 100 "$py" bench/pipeline.py --backend sd15-random --images 8 --reps 1 --no-memory
step pipeline_hidden 110 "$py" bench/pipeline.py --backend sd15-random --images 8 --reps 1 --no-memory --kv-store hidden
step attention 90 "$py" bench/attention.py --backend sd15
# torch.profiler on the H200 outran 120 s at 8 images x 50 steps and 80 s at 2 x 20 (session 13)
step profile 120 "$py" bench/pipeline.py --backend sd15-random --images 2 --steps 5 --profile torch --profile-top 15
