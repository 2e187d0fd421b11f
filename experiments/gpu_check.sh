#!/usr/bin/env bash
# One device call for BENCHMARKS section 7 (a lent H100 / H200): LLaVA-OV-0.5B architecture, random weights.
# Run from the repository root on the GPU machine; results land in $OUT (or outputs/bench/gpu).
#   0. the streaming attention's fused kernel on this GPU, checked against the masked path;
#   1. make bench at 16-frame chunks (BENCH_CHUNKS to add more), each method's steady chunk and answer
#      profiled, plus the plain causal prefill of one chunk (the architecture's own cost at that size);
#   2. the growth run of section 7 (480 frames, vision included).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
O=${OUT:-outputs/bench/gpu}
mkdir -p "$O"
W=$(mktemp -d)
{
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 experiments/gpu_attention_check.py
for c in ${BENCH_CHUNKS:-16}; do
  python3 -m mukv.bench --model 0.5b --device cuda --frames 256 --chunk "$c" --new-tokens 16 \
    --methods ${BENCH_METHODS:-full,sliding_window,rekv,mukv mukv cache.share_prefixes=false} --profile "$W/prof$c" \
    --out "$O/bench$c.json"
done
python3 -m mukv.bench --growth --model 0.5b --device cuda --frames 480 --chunk 16 --answer-every 160 \
  --methods ${GROWTH_METHODS:-rekv,mukv mukv cache.share_prefixes=false} --out "$W/growth"
} 2>&1 | grep -v "it/s]" | tee "$O/log.txt"
tar czf "$O/details.tgz" -C "$W" .
