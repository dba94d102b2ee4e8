"""Files. Output written whole or not at all: under a temporary ``.partial`` name, renamed into place once
complete, so a kill never leaves a file that looks finished (the trainers remove ``.partial`` leftovers). Users'
text files (captions, prompt files, metadata tables) read as the editors that wrote them saved them."""

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


_UTF16_BOMS = (b'\xff\xfe', b'\xfe\xff')


def read_text(path: str, what: str) -> str:
    """A user's text file: UTF-8 with or without a byte-order mark, or UTF-16 with one (Windows Notepad's
    "Unicode"). Anything else (GBK, say) is one error naming the file, not a guess at its encoding. ``what``: what
    the file is, for the error."""
    with open(path, 'rb') as f:
        data = f.read()
    try:
        return data.decode('utf-16' if data.startswith(_UTF16_BOMS) else 'utf-8-sig')
    except UnicodeDecodeError as err:
        raise ValueError(f'{what} {path!r} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8, '
                         "e.g. with your editor's 'Save as UTF-8' or `iconv -f GBK -t UTF-8`.") from err
