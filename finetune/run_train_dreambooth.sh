#!/usr/bin/env bash
# DreamBooth for Stable Diffusion v1.5. Every variable can be set from the environment; any extra flags
# (diffusers' names, or ModelScope's example flags such as --work_dir) are passed through:
#   INSTANCE_DIR=./dog INSTANCE_PROMPT='a photo of sks dog' CLASS_PROMPT='a photo of dog' \
#     bash finetune/run_train_dreambooth.sh --with_prior_preservation
#   bash finetune/run_train_dreambooth.sh --use_lora          # adapters instead of a full UNet fine-tune
# Multi-GPU / multi-node: `accelerate config` once; `accelerate launch` picks that configuration up.
set -euo pipefail

MODEL="${MODEL:-AI-ModelScope/stable-diffusion-v1-5}"   # ModelScope id or diffusers folder
REVISION="${REVISION:-}"                               # hub revision (empty: v1.0.0 for the default model, else the hub's default)
INSTANCE_DIR="${INSTANCE_DIR:-}"                         # folder of 3-20 subject photos
INSTANCE_PROMPT="${INSTANCE_PROMPT:-a photo of sks dog}"
CLASS_PROMPT="${CLASS_PROMPT:-a photo of dog}"
OUTPUT_DIR="${OUTPUT_DIR:-./sd-dreambooth}"
RESOLUTION="${RESOLUTION:-512}"
MAX_TRAIN_STEPS="${MAX_TRAIN_STEPS:-400}"
LEARNING_RATE="${LEARNING_RATE:-}"                       # empty: 5e-6 (full) or 1e-4 (--use_lora)
BATCH_SIZE="${BATCH_SIZE:-1}"
MIXED_PRECISION="${MIXED_PRECISION:-}"                   # no | fp16 | bf16 (empty: accelerate's config)
ACCELERATE_ARGS="${ACCELERATE_ARGS:-}"                   # e.g. "--num_processes 2"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}"
# Ctrl-C or SIGTERM: the trainer saves a checkpoint first, and this script returns when it has
# shellcheck source=launch.sh
source "$HERE/launch.sh"
# shellcheck disable=SC2086  # ACCELERATE_ARGS is a list of flags
launch_trainer $ACCELERATE_ARGS "$HERE/train_dreambooth.py" \
  --pretrained_model_name_or_path "$MODEL" ${REVISION:+--revision "$REVISION"} \
  ${INSTANCE_DIR:+--instance_data_dir "$INSTANCE_DIR"} \
  --instance_prompt "$INSTANCE_PROMPT" --class_prompt "$CLASS_PROMPT" \
  --output_dir "$OUTPUT_DIR" --resolution "$RESOLUTION" --max_train_steps "$MAX_TRAIN_STEPS" \
  ${LEARNING_RATE:+--learning_rate "$LEARNING_RATE"} --train_batch_size "$BATCH_SIZE" \
  ${MIXED_PRECISION:+--mixed_precision "$MIXED_PRECISION"} \
  "$@"
