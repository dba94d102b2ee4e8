"""Textual-inversion embeddings (A1111's ``embeddings/`` files, e.g. negative embeddings from civitai): each
becomes a word of the tokenizer, named as A1111 names it, by its file name, and is used by writing that word in a
prompt or negative prompt. diffusers' ``load_textual_inversion`` does the loading; this file finds the tensor in
the file formats in use and refuses what cannot fit this model by name."""

import os
from typing import List, Optional, Tuple

import torch

from .constants import PICKLE_SUFFIXES
from .loading import check_safetensors

SDXL_KEYS = ('clip_l', 'clip_g')


DIFFUSERS_FILES = ('learned_embeds.safetensors', 'learned_embeds.bin')  # diffusers' textual_inversion.py writes them


def embedding_file(path: str) -> str:
    """The file of an embedding given as a file, or as the output folder of diffusers' textual-inversion script."""
    if os.path.isdir(path):
        found = [os.path.join(path, name) for name in DIFFUSERS_FILES if os.path.isfile(os.path.join(path, name))]
        if not found:
            raise FileNotFoundError(f'textual_inversion={path!r} is a folder without {" or ".join(DIFFUSERS_FILES)} '
                                    "(what diffusers' textual-inversion training writes): pass the embedding file.")
        return found[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f'textual_inversion={path!r}: no such file or folder.')
    return path


def _named(textual_inversion) -> List[Tuple[Optional[str], str]]:
    """A path, a list of paths or {word: path} → [(word, path)]. A1111 names an embedding by its file name;
    diffusers' training output (a ``learned_embeds`` file or its folder) by the word stored in the file: None."""
    if isinstance(textual_inversion, dict):
        return [(str(word), os.fspath(path)) for word, path in textual_inversion.items()]
    paths = textual_inversion if isinstance(textual_inversion, (list, tuple)) else [textual_inversion]
    if not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise TypeError(f'textual_inversion must be a path, a list of them, or {{word: path}}, got '
                        f'{textual_inversion!r:.80}')
    named = []
    for path in map(os.fspath, paths):
        file_name = os.path.basename(embedding_file(path))
        named.append((None if file_name in DIFFUSERS_FILES else os.path.splitext(file_name)[0], path))
    return named


def read_embedding(path: str, allow_pickle: bool = False) -> Tuple[Optional[str], torch.Tensor]:
    """The word a diffusers file stores (None for A1111's ``emb_params`` or ``string_to_param``) and the
    (vectors, width) tensor of an embedding file, or of the folder diffusers' training wrote it to."""
    given, path = path, embedding_file(path)
    if path.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise ValueError(f'textual_inversion={given!r} is a pickle file, which can run code when loaded: use its '
                             '.safetensors version, or pass allow_pickle=True if you trust it.')
        state = torch.load(path, map_location='cpu', weights_only=True)
    else:
        check_safetensors(path)  # a truncated file fails with its name
        from safetensors.torch import load_file
        state = load_file(path)
    stored = None
    if isinstance(state, dict) and 'string_to_param' in state:  # A1111's .pt
        state = state['string_to_param']
    elif isinstance(state, dict) and len(state) == 1 and 'emb_params' not in state:
        stored = str(next(iter(state)))  # diffusers' {word: tensor}
    tensors = state if isinstance(state, dict) else {'': state}
    if any(key in tensors for key in SDXL_KEYS):
        raise ValueError(f'textual_inversion={given!r} is an SDXL embedding ({"/".join(SDXL_KEYS)}), not one for '
                         'SD1.x.')
    if len(tensors) != 1 or not isinstance(next(iter(tensors.values())), torch.Tensor):
        raise ValueError(f'textual_inversion={given!r} holds {sorted(tensors)[:5]}: expected one embedding tensor '
                         "(A1111's emb_params, or diffusers' {word: tensor}).")
    embedding = next(iter(tensors.values()))
    if embedding.is_floating_point() and not bool(torch.isfinite(embedding).all()):
        raise ValueError(f'textual_inversion={given!r} holds NaN or inf: the training that wrote it diverged, and '
                         'every image whose prompt uses it would come out black. Use an earlier version of the '
                         'embedding.')
    return stored, embedding[None] if embedding.ndim == 1 else embedding


def load_embeddings(pipe, textual_inversion, allow_pickle: bool = False) -> List[str]:
    """Add each embedding to ``pipe``'s tokenizer and text encoder; returns the words, in order."""
    if textual_inversion is None:
        return []
    width = pipe.text_encoder.get_input_embeddings().weight.shape[-1]
    words = []
    for word, path in _named(textual_inversion):
        stored, embedding = read_embedding(path, allow_pickle)
        if word is None and not stored:
            raise ValueError(f'textual_inversion={path!r} names no word: pass textual_inversion={{word: path}}.')
        named_by_file, word = word is not None, word or stored
        if embedding.ndim != 2 or embedding.shape[-1] != width:
            raise ValueError(f'textual_inversion={path!r} has vectors of width {embedding.shape[-1]}, and this '
                             f'model\'s text encoder takes {width} (SD1.x: 768; 1024 is SD2.x).')
        if word in pipe.tokenizer.get_vocab():
            fix = 'Rename the file, or pass' if named_by_file else 'Pass'
            raise ValueError(f'textual_inversion={path!r}: {word!r} is already a word of the tokenizer. {fix} '
                             "textual_inversion={'another_word': path}.")
        pipe.load_textual_inversion(embedding, token=word)
        words.append(word)
    return words

