#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one command (CUDA machine, ~15 minutes on an H200):
#   bash benchmarks/gpu_suite.sh OUTDIR [STEP...]
# GPU tests first (the fused path's correctness), then the layer, launch, host-profile, train-step and generate
# benchmarks; each step's JSON and log land in OUTDIR, and a failing step does not stop the ones after it.
# Naming steps runs only those, to split the suite over calls with a time limit (10 min each on the H200 here:
# `tests layer_pure train_pure`, then `generate`, then `generate_eager layer_amp launch host_profile host_sections`;
# decoding is host-bound there, so the generate steps time their variants in turns: 287 s for `generate` in session 9).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR [STEP...]}
shift
only=" $* "
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUTDIR/NAME.log, print the log's tail
  local name=$1 limit=$2
  shift 2
  if [[ "$only" != "  " && "$only" != *" $name "* ]]; then return; fi
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "   exit $?"
  tail -n 15 "$out/$name.log"
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader >"$out/gpu.txt" 2>&1
step tests 180 python3 -m pytest -q tests/test_ops.py
step layer_pure 150 python3 benchmarks/bench_layer.py --device cuda --precision pure --json "$out/layer_pure.json"
step layer_amp 120 python3 benchmarks/bench_layer.py --device cuda --precision amp --json "$out/layer_amp.json"
step launch 60 python3 benchmarks/launch_overhead.py --device cuda --json "$out/launch.json"
step host_profile 60 python3 benchmarks/profile_layer.py --device cuda --variant "ours fused" --host --steps 50
step host_sections 90 python3 benchmarks/host_sections.py --device cuda --json "$out/host_sections.json"
step train_pure 260 python3 benchmarks/bench_train_step.py --device cuda --precision pure --json "$out/train_pure.json"
step generate 340 python3 benchmarks/bench_generate.py --device cuda --repeats 3 --variants base,peft,fused,merged --json "$out/generate.json"
step generate_eager 340 python3 benchmarks/bench_generate.py --device cuda --repeats 3 --variants peft,eager,fused --json "$out/generate_eager.json"
