"""Prompts longer than CLIP's 77 tokens and A1111's emphasis syntax.

``(word)`` weighs by 1.1, ``[word]`` by 1/1.1, ``(word:1.5)`` by 1.5; they nest and multiply; ``\\(``
is a literal parenthesis. Unbalanced brackets are read literally, with a warning. A long prompt is cut
into 75-token windows, each encoded as its own 77-token CLIP sequence, and the results are concatenated
(what A1111 does); the UNet's cross-attention takes any sequence length. Each token's embedding is
multiplied by its weight, so emphasis changes the emphasised tokens only. ``BREAK`` (in capitals, a word of
its own) ends the window it is in, padded, and the text after it starts the next one, as in A1111.
"""

import logging
import re
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

logger = logging.getLogger(__name__)

CHUNK = 75  # tokens per window, plus BOS and EOS = CLIP's 77
_TOKEN = re.compile(r'\\[()\[\]]|\(|\)|\[|\]|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|[^\\()\[\]:]+|:|\\')
_SYNTAX = re.compile(r'(?<!\\)[()\[\]]')
_BREAK = re.compile(r'\s*\bBREAK\b\s*')


def has_syntax(text: str) -> bool:
    return bool(_SYNTAX.search(text) or _BREAK.search(text))


def parse_weights(text: str) -> List[Tuple[str, float]]:
    """'a (red:1.5) [hat]' → [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('hat', 0.909…)]."""
    if not _balanced(text):
        logger.warning('Unbalanced brackets in prompt %r: reading it literally, without weights.', text)
        return [(text, 1.0)]
    pieces: List[Tuple[str, float]] = []
    stack: List[Tuple[str, int]] = []  # ('(' or '[', index in pieces where the group starts)
    for match in _TOKEN.finditer(text):
        token = match.group(0)
        if token.startswith('\\') and len(token) == 2:
            pieces.append((token[1], 1.0))
        elif token in '([':
            stack.append((token, len(pieces)))
        elif token == ']':
            _scale(pieces, stack.pop()[1], 1 / 1.1)
        elif token == ')':
            _scale(pieces, stack.pop()[1], 1.1)
        elif match.group(1) is not None:  # ':1.5)' closes a weighted group
            opener, start = stack.pop()
            _scale(pieces, start, float(match.group(1)))
        else:
            pieces.append((token, 1.0))
    merged: List[Tuple[str, float]] = []
    for piece, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged


def _scale(pieces, start: int, factor: float) -> None:
    for i in range(start, len(pieces)):
        pieces[i] = (pieces[i][0], pieces[i][1] * factor)


def _balanced(text: str) -> bool:
    depth = []
    for char in re.sub(r'\\[()\[\]]', '', text):
        if char in '([':
            depth.append(char)
        elif char in ')]':
            if not depth or {'(': ')', '[': ']'}[depth.pop()] != char:
                return False
    return not depth


def tokens_with_weights(tokenizer, text: str) -> Tuple[List[int], List[float]]:
    ids, weights = [], []
    for piece, weight in parse_weights(text):
        for i, part in enumerate(_BREAK.split(piece)):
            if i:  # BREAK: pad to the window's end (a full window needs none; at the start, a whole empty one)
                fill = -len(ids) % CHUNK if ids else CHUNK
                ids.extend([_pad_id(tokenizer)] * fill)
                weights.extend([1.0] * fill)
            part_ids = tokenizer(part, add_special_tokens=False, verbose=False).input_ids
            ids.extend(part_ids)
            weights.extend([weight] * len(part_ids))
    return ids, weights


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def needs_long_path(tokenizer, text: Optional[str]) -> bool:
    """Plain prompts that fit in one window stay on diffusers' own encoding (identical embeddings)."""
    if not text:
        return False
    return has_syntax(text) or len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids) > CHUNK


def _windows(tokenizer, ids: List[int], weights: List[float], count: int):
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, _pad_id(tokenizer)
    for i in range(count):
        chunk_ids, chunk_w = ids[i * CHUNK:(i + 1) * CHUNK], weights[i * CHUNK:(i + 1) * CHUNK]
        fill = CHUNK - len(chunk_ids)
        yield ([bos] + chunk_ids + [eos] + [pad] * fill,
               [1.0] + chunk_w + [1.0] + [1.0] * fill)


@torch.no_grad()
def encode(pipe, prompts: List[str], clip_skip: Optional[int], windows: int) -> torch.Tensor:
    """(len(prompts), 77 * windows, hidden) weighted embeddings for a diffusers SD pipeline."""
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    device = text_encoder.device
    out = []
    for text in prompts:
        ids, weights = tokens_with_weights(tokenizer, text or '')
        parts = []
        for chunk_ids, chunk_w in _windows(tokenizer, ids, weights, windows):
            input_ids = torch.tensor([chunk_ids], device=device)
            if clip_skip is None:
                hidden = text_encoder(input_ids)[0]
            else:
                states = text_encoder(input_ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
                hidden = text_encoder.text_model.final_layer_norm(states) if hasattr(
                    text_encoder, 'text_model') else text_encoder.final_layer_norm(states)
            # hidden.device, not device: an offload hook may have run the encoder elsewhere
            parts.append(hidden * torch.tensor(chunk_w, device=hidden.device, dtype=hidden.dtype)[None, :, None])
        out.append(torch.cat(parts, dim=1))
    return torch.cat(out).to(pipe.unet.dtype)


def window_ids(tokenizer, text: str, max_windows: int) -> List[int]:
    """``text`` as ``encode`` feeds it to CLIP, unweighted: as many windows of BOS + 75 tokens + EOS (padded) as it
    needs, at most ``max_windows`` (tokens past them are cut), concatenated. One window is CLIP's usual 77 ids."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    windows = max(1, min(max_windows, -(-len(ids) // CHUNK)))
    return [i for chunk, _ in _windows(tokenizer, ids, [1.0] * len(ids), windows) for i in chunk]


def text_inputs(pipe, prompt: Union[str, List[str]], negative_prompt: Union[str, List[str], None] = None,
                clip_skip: Optional[int] = None) -> Dict[str, Any]:
    """The text arguments of a diffusers SD pipeline call. Plain prompts of up to 75 tokens go as text (diffusers'
    exact encoding); longer or weighted ones as embeddings in 75-token windows with per-token weights."""
    prompts = prompt if isinstance(prompt, list) else [prompt]
    negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ''] * len(prompts)
    # a textual-inversion word of n vectors stands for n tokens: 'word word_1 … word_{n-1}'. diffusers expands it
    # itself on its own path, so only the length check and our encoding see the expanded text
    expand = getattr(pipe, 'maybe_convert_prompt', lambda text, tokenizer: text)
    expanded = [expand(t, pipe.tokenizer) if t else t for t in prompts + negatives]
    if not any(needs_long_path(pipe.tokenizer, t) for t in expanded):
        # lists on both sides: diffusers refuses a str beside a list
        return {'prompt': prompts, 'negative_prompt': None if negative_prompt is None else negatives,
                'clip_skip': clip_skip}
    windows = window_count(pipe.tokenizer, expanded)
    return {'prompt_embeds': encode(pipe, expanded[:len(prompts)], clip_skip, windows),
            'negative_prompt_embeds': encode(pipe, expanded[len(prompts):], clip_skip, windows)}


def window_count(tokenizer, texts: List[Optional[str]]) -> int:
    longest = max(len(tokens_with_weights(tokenizer, t or '')[0]) for t in texts)
    return max(1, -(-longest // CHUNK))
