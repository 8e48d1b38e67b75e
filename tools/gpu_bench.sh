#!/usr/bin/env bash
# The prepared GPU benchmark: T5 v1.1 base and large, this project against the paper's
# PyTorch trainer, training (several ways of running our network) and decoding, in one
# command that fits a device window (about 7 minutes on an H200, compiles included).
#
# The GPU machine has no TensorFlow, SeqIO, gin-config or network. Prepare, on a CPU
# machine with this project installed (see README, "Benchmarks"):
#   echo /.whl/ >> .git/info/exclude; echo /.gpu/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl gin-config==0.5.0
#   python tools/bench.py --write_batches .gpu/cqa_512.npz --batch_size 512 --steps 5 --warmup 2
# then run there, with .whl and .gpu carried:  bash tools/gpu_bench.sh "$OUT"
# A CPU dry run of the same path: GPU_BENCH_CONFIGS=tiny bash tools/gpu_bench.sh /tmp/out
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/gpu_bench}}"
mkdir -p "$out"
if ! python3 -c "import gin" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
batches="${GPU_BENCH_BATCHES:-.gpu/cqa_512.npz}"
common=(--batches "$batches" --dtype bfloat16 --steps 5 --warmup 2 --decode_batch_size 128
        --peak_size 8192 --out "$out/gpu_bench.jsonl")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$out/gpu.txt" || true
# base: the defaults (scanned layers, XLA's dense backward, einsum attention, dropout 0.1)
# and a profile of them; then the CPU-tuned dense backward, no dropout, and cuDNN's fused
# attention (which has no attention dropout).
python3 tools/bench.py "${common[@]}" --config "${GPU_BENCH_CONFIGS:-base}" --profile_steps 2 \
  --deadline_minutes 3 \
  --variants ";dense_backward=materialized;dropout_rate=0.0;dropout_rate=0.0,attention_implementation=cudnn" \
  2>&1 | tee "$out/gpu_bench_base.log"
# large: the defaults, and activations rematerialized (projections kept) for memory.
python3 tools/bench.py "${common[@]}" --config "${GPU_BENCH_CONFIGS:-large}" \
  --deadline_minutes 3 --variants ";remat_policy=dots_no_batch" \
  2>&1 | tee "$out/gpu_bench_large.log"
# base again, our side only, under the XLA flags MaxText recommends for GPUs (cuBLAS for
# every product instead of Triton's, the latency-hiding scheduler).
XLA_FLAGS="--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_latency_hiding_scheduler=true" \
  python3 tools/bench.py "${common[@]}" --config "${GPU_BENCH_CONFIGS:-base}" --jax_only \
  --deadline_minutes 1 2>&1 | tee "$out/gpu_bench_base_xla_flags.log"
