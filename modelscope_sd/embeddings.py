"""Textual-inversion embeddings (A1111's ``embeddings/`` files, e.g. negative embeddings from civitai): each
becomes a word of the tokenizer, named as A1111 names it, by its file name, and is used by writing that word in a
prompt or negative prompt. diffusers' ``load_textual_inversion`` does the loading; this file finds the tensor in
the file formats in use and refuses what cannot fit this model by name."""

import os
from typing import Dict, List

import torch

from .constants import PICKLE_SUFFIXES
from .loading import check_safetensors

SDXL_KEYS = ('clip_l', 'clip_g')


def _named(textual_inversion) -> Dict[str, str]:
    """A path, a list of paths (each named by its file name) or {word: path} → {word: path}."""
    if isinstance(textual_inversion, dict):
        return {str(word): os.fspath(path) for word, path in textual_inversion.items()}
    paths = textual_inversion if isinstance(textual_inversion, (list, tuple)) else [textual_inversion]
    if not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise TypeError(f'textual_inversion must be a file path, a list of them, or {{word: path}}, got '
                        f'{textual_inversion!r:.80}')
    return {os.path.splitext(os.path.basename(os.fspath(p)))[0]: os.fspath(p) for p in paths}


def read_embedding(path: str, allow_pickle: bool = False) -> torch.Tensor:
    """The (vectors, width) tensor of an A1111 (``emb_params`` or ``string_to_param``) or diffusers
    ({word: tensor}) embedding file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'textual_inversion={path!r}: no such file.')
    if path.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise ValueError(f'textual_inversion={path!r} is a pickle file, which can run code when loaded: use its '
                             '.safetensors version, or pass allow_pickle=True if you trust it.')
        state = torch.load(path, map_location='cpu', weights_only=True)
    else:
        check_safetensors(path)  # a truncated file fails with its name
        from safetensors.torch import load_file
        state = load_file(path)
    if isinstance(state, dict) and 'string_to_param' in state:  # A1111's .pt
        state = state['string_to_param']
    tensors = state if isinstance(state, dict) else {'': state}
    if any(key in tensors for key in SDXL_KEYS):
        raise ValueError(f'textual_inversion={path!r} is an SDXL embedding ({"/".join(SDXL_KEYS)}), not one for SD1.x.')
    if len(tensors) != 1 or not isinstance(next(iter(tensors.values())), torch.Tensor):
        raise ValueError(f'textual_inversion={path!r} holds {sorted(tensors)[:5]}: expected one embedding tensor '
                         "(A1111's emb_params, or diffusers' {word: tensor}).")
    embedding = next(iter(tensors.values()))
    if embedding.is_floating_point() and not bool(torch.isfinite(embedding).all()):
        raise ValueError(f'textual_inversion={path!r} holds NaN or inf: the training that wrote it diverged, and every '
                         'image whose prompt uses it would come out black. Use an earlier version of the embedding.')
    return embedding[None] if embedding.ndim == 1 else embedding


def load_embeddings(pipe, textual_inversion, allow_pickle: bool = False) -> List[str]:
    """Add each embedding to ``pipe``'s tokenizer and text encoder; returns the words, in order."""
    if textual_inversion is None:
        return []
    width = pipe.text_encoder.get_input_embeddings().weight.shape[-1]
    words = []
    for word, path in _named(textual_inversion).items():
        embedding = read_embedding(path, allow_pickle)
        if embedding.ndim != 2 or embedding.shape[-1] != width:
            raise ValueError(f'textual_inversion={path!r} has vectors of width {embedding.shape[-1]}, and this '
                             f'model\'s text encoder takes {width} (SD1.x: 768; 1024 is SD2.x).')
        if word in pipe.tokenizer.get_vocab():
            raise ValueError(f'textual_inversion={path!r}: {word!r} is already a word of the tokenizer. Rename the '
                             "file, or pass textual_inversion={'another_word': path}.")
        pipe.load_textual_inversion(embedding, token=word)
        words.append(word)
    return words

