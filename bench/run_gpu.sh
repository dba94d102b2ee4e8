#!/usr/bin/env bash
# One prepared GPU session: inference benchmark (vanilla vs ours vs ours fast), then training benchmark.
# On the lent GPU machine, where diffusers/modelscope are missing, wheels come from .whl/ (see README).
# Results go to $OUT (or ./bench-results) as JSON lines and logs.
set -uo pipefail
OUT="${OUT:-./bench-results}"
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}" || exit 1
fi
export PYTHONPATH="$(pwd):${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
export MODELSCOPE_CACHE=/tmp/modelscope_cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers, peft, accelerate, modelscope_sd; print('versions', torch.__version__, diffusers.__version__, transformers.__version__, peft.__version__, accelerate.__version__)" 2>&1 | tail -3
timeout "${INFER_TIMEOUT:-400}" python3 bench/bench_inference.py --second_start --out "$OUT/inference.jsonl" 2>&1 \
  | grep -v "^\[transformers\]" | tee "$OUT/inference.log" | grep -v "^{" | tail -20
timeout "${TRAIN_TIMEOUT:-180}" python3 bench/bench_training.py --out "$OUT/training.jsonl" 2>&1 \
  | grep -v "^\[transformers\]" | tee "$OUT/training.log" | grep -v "^{" | tail -12
cat "$OUT"/*.jsonl
