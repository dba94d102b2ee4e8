#!/usr/bin/env bash
# LoRA fine-tuning of Stable Diffusion v1.5. Every variable can be set from the environment; any extra
# flags (diffusers' names, or ModelScope's example flags such as --work_dir) are passed through:
#   MODEL=./my-sd DATASET=./my-images MAX_TRAIN_STEPS=2000 bash finetune/run_train_lora.sh --train_text_encoder
# Multi-GPU / multi-node: `accelerate config` once; `accelerate launch` picks that configuration up.
set -euo pipefail

MODEL="${MODEL:-AI-ModelScope/stable-diffusion-v1-5}"   # ModelScope id or diffusers folder
REVISION="${REVISION:-}"                               # hub revision (empty: v1.0.0 for the default model, else the hub's default)
DATASET="${DATASET:-buptwq/lora-stable-diffusion-finetune}"  # ModelScope dataset id or local folder
OUTPUT_DIR="${OUTPUT_DIR:-./sd-lora}"
RESOLUTION="${RESOLUTION:-512}"
NUM_TRAIN_EPOCHS="${NUM_TRAIN_EPOCHS:-100}"
MAX_TRAIN_STEPS="${MAX_TRAIN_STEPS:-}"                   # set to stop after N steps instead of epochs
LEARNING_RATE="${LEARNING_RATE:-1e-4}"
RANK="${RANK:-4}"
BATCH_SIZE="${BATCH_SIZE:-1}"
MIXED_PRECISION="${MIXED_PRECISION:-}"                   # no | fp16 | bf16 (empty: accelerate's config)
ACCELERATE_ARGS="${ACCELERATE_ARGS:-}"                   # e.g. "--num_processes 2"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}"
# Ctrl-C or SIGTERM: the trainer saves a checkpoint first, and this script returns when it has
# shellcheck source=launch.sh
source "$HERE/launch.sh"
# shellcheck disable=SC2086  # ACCELERATE_ARGS is a list of flags
launch_trainer $ACCELERATE_ARGS "$HERE/train_lora.py" \
  --pretrained_model_name_or_path "$MODEL" ${REVISION:+--revision "$REVISION"} \
  --dataset_name "$DATASET" --output_dir "$OUTPUT_DIR" --resolution "$RESOLUTION" \
  --num_train_epochs "$NUM_TRAIN_EPOCHS" ${MAX_TRAIN_STEPS:+--max_train_steps "$MAX_TRAIN_STEPS"} \
  --learning_rate "$LEARNING_RATE" --rank "$RANK" \
  --train_batch_size "$BATCH_SIZE" ${MIXED_PRECISION:+--mixed_precision "$MIXED_PRECISION"} \
  "$@"
