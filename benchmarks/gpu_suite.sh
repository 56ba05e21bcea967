#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one command, about 5 minutes on one H100 or H200:
#   bash benchmarks/gpu_suite.sh [OUTDIR]          (default: $OUT)
# The fused op's GPU tests (pytest -m gpu, kernels without autotuning), then, each under a time limit and writing
# JSON as it goes: the layer step, the LLaMA-7B-shaped train step and decode; a failing or cut step does not stop
# the ones after it. Ends with the tables of docs/performance.md (benchmarks/perf_tables.py, also OUTDIR/tables.md).
set -uo pipefail
out=${1:-${OUT:?usage: bash benchmarks/gpu_suite.sh OUTDIR (or set OUT)}}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUTDIR/NAME.log, print the log's tail
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s (limit $limit s)"
  tail -n 4 "$out/$name.log"
}
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
  git log -1 --format='commit %H' 2>/dev/null
  # a copied working tree may carry a stale .git: the library's own files identify the code measured
  echo "src sha256 $(find src -name '*.py' | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16)"
  python3 -c 'import torch, triton, transformers, peft; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
} >"$out/env.txt" 2>&1
step tests 150 env HYDRALORA_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_ops.py
step layer 45 python3 benchmarks/bench_layer.py --device cuda --repeats 15 \
  --variants "base,peft r8,ours,ours eager,ours svd" --json "$out/layer.json"
step train_step 100 python3 benchmarks/bench_train_step.py --device cuda --steps 4 --warmup 2 \
  --variants "base,peft r8,peft r18,ours" --json "$out/train_step.json"
step generate 150 python3 benchmarks/bench_generate.py --device cuda --models llama7b-8l --new-tokens 48 --repeats 5 \
  --gpu-tokens 9 --variants base,peft,token,sequence,merged --json "$out/generate.json"
python3 benchmarks/perf_tables.py "$out" --out "$out/tables.md"
