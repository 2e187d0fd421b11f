#!/usr/bin/env bash
# One device call for BENCHMARKS section 7 (a lent H100 / H200): LLaVA-OV-0.5B architecture, random weights.
# Run from the repository root on the GPU machine; results land in $OUT (or outputs/bench/gpu), every table in
# log.txt and one JSON per step:
#   0. the streaming attention's fused kernels on this GPU (log-sum-exp, sliding window), checked against the masked path;
#   1. operator calls and host reads per steady 16-frame chunk and per answer token, every method, eager and
#      with engine.compile (ops_eager.json, ops_compiled.json; the same counts as on the CPU, plus real device
#      tensors for the host reads);
#   2. make bench at 16-frame chunks, every method, each method's steady chunk and answer profiled (device busy
#      against wall time, host-device waits by line), plus the plain causal prefill of one chunk (the roofline
#      reference), eager (bench16.json) and compiled (bench16_compiled.json);
#   3. the growth run of section 7 (480 frames, vision included), eager.
# Budget: about 6 minutes of device time on an H200 (compilation included). Knobs, for a shorter call:
#   GPU_CHECK_METHODS (default: every registered method), BENCH_CHUNKS (16), FRAMES (256), COMPILE (reduce_overhead;
#   "none" skips the compiled runs), GROWTH_METHODS, SKIP_GROWTH=1; GPU_CHECK_DEVICE / GPU_CHECK_MODEL / GROWTH_MODEL
#   run the same script on a CPU with small settings (tests/test_bench.py does, so that it stays runnable).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
O=${OUT:-outputs/bench/gpu}
DEV=${GPU_CHECK_DEVICE:-cuda}
MODEL=${GPU_CHECK_MODEL:-0.5b}
FRAMES=${FRAMES:-256}
COMPILE=${COMPILE:-reduce_overhead}
METHODS=${GPU_CHECK_METHODS:-}
mkdir -p "$O"
W=$(mktemp -d)
{
if [ "$DEV" != "cpu" ]; then
  nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [ "$DEV" != "cpu" ]; then
  python3 experiments/gpu_attention_check.py
fi
python3 -m mukv.bench --ops --model "$MODEL" --device "$DEV" --chunk 16 ${METHODS:+--methods $METHODS} \
  --out "$O/ops_eager.json"
if [ "$COMPILE" != "none" ]; then
  python3 -m mukv.bench --ops --model "$MODEL" --device "$DEV" --chunk 16 --compile "$COMPILE" \
    ${METHODS:+--methods $METHODS} --out "$O/ops_compiled.json"
fi
for c in ${BENCH_CHUNKS:-16}; do
  python3 -m mukv.bench --model "$MODEL" --device "$DEV" --frames "$FRAMES" --chunk "$c" --new-tokens 16 \
    ${METHODS:+--methods $METHODS} --profile "$W/prof$c" --out "$O/bench$c.json"
  if [ "$COMPILE" != "none" ]; then
    python3 -m mukv.bench --model "$MODEL" --device "$DEV" --frames "$FRAMES" --chunk "$c" --new-tokens 16 \
      --compile "$COMPILE" ${METHODS:+--methods $METHODS} --profile "$W/prof${c}_compiled" \
      --out "$O/bench${c}_compiled.json"
  fi
done
if [ -z "${SKIP_GROWTH:-}" ]; then
  python3 -m mukv.bench --growth --model "${GROWTH_MODEL:-$MODEL}" --device "$DEV" --frames "${GROWTH_FRAMES:-480}" \
    --chunk 16 --answer-every 160 --methods ${GROWTH_METHODS:-rekv,mukv mukv cache.share_prefixes=false} \
    --out "$W/growth"
fi
} 2>&1 | grep -v "it/s]" | tee "$O/log.txt"
tar czf "$O/details.tgz" -C "$W" .
