#!/usr/bin/env bash
# One prepared GPU session: the opt-in GPU tests on the tiny model, SDPA backends at SD1.5's attention shapes, the
# inference benchmark (vanilla vs ours vs ours fast), then the training benchmark. PARTS picks some of
# tests,attention,inference,training; INFER_ARGS and TRAIN_ARGS pass options on (e.g. INFER_ARGS=--compare_loops,
# TRAIN_ARGS="--only lora,compile"), TESTS_K a pytest -k expression for the GPU tests; TRACE=1 also brings back the
# profiled calls' timelines (each one tens of MB before gzip), NO_PROFILE=1 leaves the profiles out (a training row
# then takes two runs less).
# On the lent GPU machine, where diffusers/modelscope are missing, wheels come from .whl/ (see README).
# Results go to $OUT (or ./bench-results) as JSON lines and logs. DRY_RUN=1 runs every part on the CPU with the
# tiny model and few steps, with the installed packages: the script itself checked before GPU time is spent on it.
# BUDGET_S (default 570) caps the whole script: each part's time limit is at most what is left of it, so a device
# call with a 600 s limit ends with every finished row written and the log of the part that was cut.
set -uo pipefail
OUT="${OUT:-./bench-results}"
mkdir -p "$OUT"
DEVICE_ARGS="" ATTENTION_ARGS=""
if [ "${DRY_RUN:-0}" = 1 ]; then
  DEVICE_ARGS="--device cpu --tiny" ATTENTION_ARGS="--device cpu --repeats 1"
  INFER_SIZE="--steps 4 --repeats 1 --batch 2 --profile_steps 2" TRAIN_SIZE="--steps 2 --warmup 1 --profile_steps 2"
elif [ -d .whl ]; then  # once per machine: a second call of this script on the same machine reuses /tmp/site
  [ -f /tmp/site/.installed ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}" || exit 1
fi
export PYTHONPATH="$(pwd):${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
export MODELSCOPE_CACHE=/tmp/modelscope_cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers, peft, accelerate, modelscope_sd; print('versions', torch.__version__, diffusers.__version__, transformers.__version__, peft.__version__, accelerate.__version__)" 2>&1 | tail -3
PARTS="${PARTS:-tests,attention,inference,training}"
TRACES="$(mktemp -d)/traces"
PROFILE="--profile"; [ "${NO_PROFILE:-0}" = 1 ] && PROFILE=""
BUDGET_S="${BUDGET_S:-570}"
left() {  # seconds for the next part: its own limit, or what is left of the budget if that is less
  local rest=$((BUDGET_S - SECONDS)); [ "$rest" -lt "$1" ] && echo $((rest > 1 ? rest : 1)) || echo "$1"
}
if [[ "$PARTS" == *tests* ]]; then
  timeout "$(left "${TESTS_TIMEOUT:-240}")" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 \
    | tee "$OUT/gpu-tests.log" | tail -15
fi
if [[ "$PARTS" == *attention* ]]; then
  timeout "$(left 120)" python3 bench/bench_attention.py $ATTENTION_ARGS --out "$OUT/attention.jsonl" 2>&1 | tail -1
fi
if [[ "$PARTS" == *inference* ]]; then
  timeout "$(left "${INFER_TIMEOUT:-400}")" python3 bench/bench_inference.py --second_start $PROFILE ${TRACE:+--trace_dir "$TRACES"} $DEVICE_ARGS ${INFER_SIZE:-} ${INFER_ARGS:-} \
    --out "$OUT/inference.jsonl" 2>&1 | grep -v "^\[transformers\]" | tee "$OUT/inference.log" | grep -v "^{" | tail -20
fi
if [[ "$PARTS" == *training* ]]; then
  timeout "$(left "${TRAIN_TIMEOUT:-400}")" python3 bench/bench_training.py $PROFILE ${TRACE:+--trace_dir "$TRACES"} $DEVICE_ARGS ${TRAIN_SIZE:-} ${TRAIN_ARGS:-} --out "$OUT/training.jsonl" 2>&1 \
    | grep -v "^\[transformers\]" | tee "$OUT/training.log" | grep -v "^{" | tail -14
fi
# the profiled calls' timelines as one file: a device call brings back at most 8
[ -d "$TRACES" ] && tar czf "$OUT/traces-$(date +%H%M%S).tgz" -C "$TRACES" . && rm -rf "$TRACES"
echo "run_gpu.sh: ${SECONDS}s of a ${BUDGET_S}s budget"
cat "$OUT"/*.jsonl
