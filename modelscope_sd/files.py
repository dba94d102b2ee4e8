"""Output files written whole or not at all: under a temporary ``.partial`` name, renamed into place once
complete, so a kill never leaves a file that looks finished (the trainers remove ``.partial`` leftovers)."""

import os
from typing import Dict, Optional

import torch

PARTIAL_SUFFIX = '.partial'


def save_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> str:
    from safetensors.torch import save_file
    partial = path + PARTIAL_SUFFIX
    save_file({k: v.contiguous() for k, v in tensors.items()}, partial, metadata={'format': 'pt', **(metadata or {})})
    os.replace(partial, path)
    return path
