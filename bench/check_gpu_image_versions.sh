#!/usr/bin/env bash
# Before GPU time is spent: the test suite on the CPU with the GPU image's versions of torch, transformers,
# accelerate and peft (torch 2.11 there, 2.13 in CI). torch 2.11 gave torch.compile no .aot_compile unless dynamo's
# enable_aot_compile was set, so precompile=True fell back on the GPU image while CI passed; this check found it.
# PyPI's torch 2.11 is a CUDA build (about 5 GB in the venv); it runs on the CPU. Usage:
#   bash bench/check_gpu_image_versions.sh [pytest args]     (default: the suite, then the slow precompile tests)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-/tmp/gpu-image-venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.11.0 transformers==5.17.0 accelerate==1.15.0 peft==0.21.0 -e ".[test]"
"$VENV/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [ $# -gt 0 ]; then
  exec "$VENV/bin/python" -m pytest "$@"
fi
"$VENV/bin/python" -m pytest -q
"$VENV/bin/python" -m pytest -q -m slow tests/test_precompile.py
