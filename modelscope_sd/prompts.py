"""Prompts longer than CLIP's 77 tokens and A1111's emphasis syntax.

``(word)`` weighs by 1.1, ``[word]`` by 1/1.1, ``(word:1.5)`` by 1.5; they nest and multiply; ``\\(``
is a literal parenthesis. Unbalanced brackets are read literally, with a warning. A long prompt is cut
into 75-token windows, each encoded as its own 77-token CLIP sequence, and the results are concatenated
(what A1111 does); the UNet's cross-attention takes any sequence length. A window that fills up within
20 tokens of a comma ends at that comma instead, and the words after it start the next window (A1111's
default comma backtracking). ``BREAK`` (in capitals, a word of its own) ends the window it is in, padded,
and the text after it starts the next one, as in A1111. Each token's embedding is multiplied by its weight,
then the window is rescaled to the mean it had before (A1111's default "Original" emphasis). A1111's
``<lora:name:weight>`` tags are taken out in `lora_tags`. A1111's prompt editing is read in
`prompt_editing`; the texts of each step are encoded here (`EditedPrompts`).
"""

import logging
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from . import prompt_editing as editing
from .lora_tags import EXTRA_NETWORK

logger = logging.getLogger(__name__)

CHUNK = 75  # tokens per window, plus BOS and EOS = CLIP's 77
COMMA_BACKTRACK = 20  # A1111's "comma_padding_backtrack" default
_TOKEN = re.compile(r'\\[()\[\]]|\(|\)|\[|\]|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|[^\\()\[\]:]+|:|\\')
_SYNTAX = re.compile(r'(?<!\\)[()\[\]]')
_BREAK = re.compile(r'\s*\bBREAK\b\s*')
# A1111's "Emphasis" setting: weights applied and each window's mean restored (its default); applied only; brackets
# read but weights left out; brackets (and BREAK) read as words
EMPHASIS = ('Original', 'No norm', 'Ignore', 'None')


def emphasis_name(value) -> str:
    """A1111's name for an emphasis mode, given in any case ('no norm' → 'No norm')."""
    names = {name.lower(): name for name in EMPHASIS}
    if not isinstance(value, str) or value.strip().lower() not in names:
        raise ValueError(f'emphasis={value!r} is not one of {EMPHASIS} (A1111\'s names; Original is its default).')
    return names[value.strip().lower()]


def check_syntax(name: str, text: str) -> None:
    """Refuse A1111 network tags outside the text of a call, which the encoding would otherwise read as words."""
    tag = EXTRA_NETWORK.search(text)
    if name != 'text' and tag:
        raise ValueError(f'{name}: {tag.group(0)}: A1111 network tags go in the text of a pipeline call, not here.')


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


def tokens_with_weights(tokenizer, text: str, emphasis: str = 'Original') -> Tuple[List[int], List[float]]:
    """Token ids and weights of ``text``, laid out in windows (``window_layout``), for an ``EMPHASIS`` mode."""
    if emphasis == 'None':
        return window_layout(tokenizer, [(text, 1.0)], breaks=False)
    pieces = parse_weights(text)
    return window_layout(tokenizer, [(piece, 1.0) for piece, _ in pieces] if emphasis == 'Ignore' else pieces)


def window_layout(tokenizer, pieces: List[Tuple[str, float]], max_windows: Optional[int] = None,
                  breaks: bool = True) -> Tuple[List[int], List[float]]:
    """Token ids and weights of (text, weight) pieces, laid out so that every ``CHUNK`` of them is one window:
    where BREAK or a comma ends a window early, the rest of it is padding. The last window is not padded. With
    ``max_windows`` (text past them will be cut), the last of them does not end at a comma: it keeps the words
    a plain cut keeps. A textual-inversion word of several vectors that does not fit in the rest of a window
    starts the next one, as in A1111. ``breaks=False``: BREAK is a word."""
    comma, vectors = _comma_id(tokenizer), _embedding_lengths(tokenizer)
    windows: List[Tuple[List[int], List[float]]] = [([], [])]
    last_comma = -1  # where the current window's last comma is
    for piece, weight in pieces:
        for i, part in enumerate(_BREAK.split(piece) if breaks else [piece]):
            if i:
                windows.append(([], []))
                last_comma = -1
            for token in tokenizer(part, add_special_tokens=False, verbose=False).input_ids:
                ids, weights = windows[-1]
                if token == comma:
                    last_comma = len(ids)
                elif len(ids) == CHUNK and last_comma >= 0 and CHUNK - last_comma <= COMMA_BACKTRACK and \
                        (max_windows is None or len(windows) < max_windows):
                    # the words after the window's last comma move on to the next window
                    windows.append((ids[last_comma + 1:], weights[last_comma + 1:]))
                    del ids[last_comma + 1:], weights[last_comma + 1:]
                    ids, weights = windows[-1]
                    last_comma = -1
                n = vectors.get(token, 1)  # an embedding's vectors stay in one window
                if len(ids) == CHUNK or (n > 1 and ids and len(ids) + n > CHUNK >= n):
                    windows.append(([], []))
                    ids, weights = windows[-1]
                    last_comma = -1
                ids.append(token)
                weights.append(weight)
    pad = _pad_id(tokenizer)
    flat_ids, flat_weights = [], []
    for n, (ids, weights) in enumerate(windows):
        fill = CHUNK - len(ids) if n < len(windows) - 1 else 0
        flat_ids += ids + [pad] * fill
        flat_weights += weights + [1.0] * fill
    return flat_ids, flat_weights


def _embedding_lengths(tokenizer) -> Dict[int, int]:
    """{id of a textual-inversion word: its vectors} for words of several vectors, which diffusers adds to the
    tokenizer as ``word``, ``word_1``, … ``word_{n-1}`` (and a prompt spells out in full)."""
    added = getattr(tokenizer, 'added_tokens_encoder', {})
    lengths = {}
    for name in added:
        word, _, n = name.rpartition('_')
        if n.isdigit() and word in added:
            lengths[added[word]] = max(lengths.get(added[word], 1), int(n) + 1)
    return lengths


def _comma_id(tokenizer) -> Optional[int]:
    ids = tokenizer(',', add_special_tokens=False, verbose=False).input_ids
    return ids[0] if len(ids) == 1 else None


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def needs_long_path(tokenizer, text: Optional[str], emphasis: str = 'Original') -> bool:
    """Plain prompts that fit in one window stay on diffusers' own encoding (identical embeddings)."""
    if not text:
        return False
    if emphasis != 'None' and has_syntax(text):
        return True
    return len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids) > CHUNK


def _windows(tokenizer, ids: List[int], weights: List[float], count: int):
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, _pad_id(tokenizer)
    for i in range(count):
        chunk_ids, chunk_w = ids[i * CHUNK:(i + 1) * CHUNK], weights[i * CHUNK:(i + 1) * CHUNK]
        fill = CHUNK - len(chunk_ids)
        yield ([bos] + chunk_ids + [eos] + [pad] * fill,
               [1.0] + chunk_w + [1.0] + [1.0] * fill)


def final_layer_norm(text_encoder):
    """CLIP's final layer norm (in ``text_model`` before transformers 5), through accelerate's (DDP) and
    torch.compile's wrappers: clip_skip reads an earlier layer's states through it, as diffusers does."""
    model = getattr(text_encoder, 'module', text_encoder)
    model = getattr(model, '_orig_mod', model)
    return getattr(model, 'text_model', model).final_layer_norm


def clip_states(text_encoder, input_ids: torch.Tensor, clip_skip: Optional[int] = None) -> torch.Tensor:
    """CLIP's output for ``input_ids``; with ``clip_skip`` (diffusers' count: the layers skipped) an earlier
    layer's states through the final layer norm, as diffusers reads them."""
    # without clip_skip called as diffusers' encode_prompt calls it, so that fast=True's compiled encoder runs one
    # graph for both
    if clip_skip is None:
        return text_encoder(input_ids)[0]
    states = text_encoder(input_ids, output_hidden_states=True, return_dict=True).hidden_states[-(clip_skip + 1)]
    return final_layer_norm(text_encoder)(states)


@torch.no_grad()
def encode(pipe, prompts: List[str], clip_skip: Optional[int], windows: int, emphasis: str = 'Original'
           ) -> torch.Tensor:
    """(len(prompts), 77 * windows, hidden) weighted embeddings for a diffusers SD pipeline."""
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    device = text_encoder.device
    out = []
    for text in prompts:
        ids, weights = tokens_with_weights(tokenizer, text or '', emphasis)
        parts = []
        for chunk_ids, chunk_w in _windows(tokenizer, ids, weights, windows):
            hidden = clip_states(text_encoder, torch.tensor([chunk_ids], device=device), clip_skip)
            # hidden.device, not device: an offload hook may have run the encoder elsewhere
            weights = torch.tensor(chunk_w, device=hidden.device, dtype=torch.float32)[None, :, None]
            plain = hidden.float()
            weighted = plain * weights
            if emphasis == 'Original':  # the window keeps its mean
                weighted *= plain.mean() / weighted.mean()
            parts.append(weighted.to(hidden.dtype))
        out.append(torch.cat(parts, dim=1))
    return torch.cat(out).to(pipe.unet.dtype)


def window_ids(tokenizer, text: str, max_windows: int) -> List[int]:
    """``text`` as ``encode`` feeds it to CLIP, brackets read literally (a caption): as many windows of BOS +
    75 tokens + EOS (padded) as it needs, at most ``max_windows`` (tokens past them are cut), concatenated. One
    window is CLIP's usual 77 ids."""
    ids = window_layout(tokenizer, [(text, 1.0)], max_windows)[0]
    windows = min(max_windows, window_count_of(ids))
    return [i for chunk, _ in _windows(tokenizer, ids, [1.0] * len(ids), windows) for i in chunk]


def text_inputs(pipe, prompt: Union[str, List[str]], negative_prompt: Union[str, List[str], None] = None,
                clip_skip: Optional[int] = None, emphasis: str = 'Original') -> Dict[str, Any]:
    """The text arguments of a diffusers SD pipeline call. Plain prompts of up to 75 tokens go as text (diffusers'
    exact encoding); longer or weighted ones as embeddings in 75-token windows with per-token weights, and so do
    all prompts with ``clip_skip``: diffusers' own (0.42) reads ``text_encoder.text_model``, which transformers 5's
    CLIPTextModel no longer has."""
    prompts, negatives = _as_lists(prompt, negative_prompt)
    # diffusers expands textual-inversion words itself on its own path, so only the length check and our encoding
    # see the expanded text
    expanded = [_expand(pipe, t) if t else t for t in prompts + negatives]
    if not clip_skip and not any(needs_long_path(pipe.tokenizer, t, emphasis) for t in expanded):
        # lists on both sides: diffusers refuses a str beside a list
        return {'prompt': prompts, 'negative_prompt': None if negative_prompt is None else negatives}
    windows = window_count(pipe.tokenizer, expanded, emphasis)
    return {'prompt_embeds': encode(pipe, expanded[:len(prompts)], clip_skip, windows, emphasis),
            'negative_prompt_embeds': encode(pipe, expanded[len(prompts):], clip_skip, windows, emphasis)}


def _as_lists(prompt, negative_prompt) -> Tuple[List[str], List[str]]:
    """A call's prompts and one negative prompt per prompt ('' where none is given), as lists."""
    prompts = prompt if isinstance(prompt, list) else [prompt]
    return prompts, negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ''] * len(prompts)


def _expand(pipe, text: str) -> str:
    """``text`` with each textual-inversion word of n vectors spelled as its n tokens ('word word_1 …')."""
    return pipe.maybe_convert_prompt(text, pipe.tokenizer) if hasattr(pipe, 'maybe_convert_prompt') else text


def unet_embeds(pipe, text_inputs: Dict[str, Any], num_images_per_prompt: int, cfg: bool,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """The UNet's ``encoder_hidden_states`` for text inputs, laid out as diffusers' loop has them: each prompt's
    copies side by side, and with classifier-free guidance the negative half first. Embeddings of ours are
    repeated here, as diffusers would, since with A1111's AND the positive side has more rows than the negative.
    ``device``: the pipeline's execution device, where the caller has it already."""
    device = pipe._execution_device if device is None else device
    if 'prompt_embeds' not in text_inputs:
        positive, negative = pipe.encode_prompt(text_inputs.get('prompt'), device, num_images_per_prompt, cfg,
                                                text_inputs.get('negative_prompt'))
    else:
        positive, negative = (text_inputs[key].to(device).repeat_interleave(num_images_per_prompt, 0)
                              for key in ('prompt_embeds', 'negative_prompt_embeds'))
    return torch.cat([negative, positive]) if cfg else positive


def window_count(tokenizer, texts: List[Optional[str]], emphasis: str = 'Original') -> int:
    return max(window_count_of(tokens_with_weights(tokenizer, t or '', emphasis)[0]) for t in texts)


def window_count_of(ids: List[int]) -> int:
    return max(1, -(-len(ids) // CHUNK))


# A1111's prompt editing: the texts of each pass, encoded when its UNet calls are known

def model_calls(pipe, num_inference_steps: int, strength: Optional[float] = None) -> int:
    """How many times a pass of ``pipe`` runs the UNet: the steps prompt editing counts (51 for PNDM's 50 steps;
    ``strength``: image-to-image, which runs the last part of the timesteps)."""
    device = pipe._execution_device
    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    if strength is None:
        return len(pipe.scheduler.timesteps)
    return len(pipe.get_timesteps(num_inference_steps, strength, device)[0])


@dataclass
class Composition:
    """A1111's ``AND``: each prompt's guidance is the weighted sum of its subprompts' (Composable Diffusion)."""
    prompt_of: List[int]  # the prompt each subprompt belongs to
    weights: List[float]

    def tensors(self, num_images_per_prompt: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """For each positive row of `unet_embeds` (subprompt s, copy c: row s·n + c), the image it guides (its
        prompt p: p·n + c) and its weight."""
        n = num_images_per_prompt
        index = torch.tensor([p * n + c for p in self.prompt_of for c in range(n)], device=device)
        weights = torch.tensor([w for w in self.weights for _ in range(n)], dtype=torch.float32, device=device)
        return index, weights


@dataclass
class EditedPrompts:
    """The prompts of a call where one of them (or a negative prompt) is edited, or split by ``AND``; encoded per
    pass, when the pass's UNet calls are known. With a `Composition`, ``prompts`` are the subprompts."""
    prompts: List[str]
    negatives: List[str]
    clip_skip: Optional[int]
    composition: Optional[Composition] = None
    emphasis: str = 'Original'

    def text_inputs(self, pipe, calls: int, first_pass_calls: Optional[int] = None
                    ) -> Tuple[Dict[str, torch.Tensor], Dict[int, Dict[str, torch.Tensor]]]:
        """The embeddings of call 0, and {call: embeddings} for each later call where a text changes. Every text
        of the call is encoded once, in as many 75-token windows as the longest needs, so all have one shape."""
        schedules = [editing.schedule(text, calls, first_pass_calls) for text in self.prompts + self.negatives]
        per_call = [tuple(editing.text_at(s, call) for s in schedules) for call in range(calls)]
        starts = [call for call in range(calls) if call == 0 or per_call[call] != per_call[call - 1]]
        expanded = {text: _expand(pipe, text) for call in starts for text in per_call[call]}
        windows = window_count(pipe.tokenizer, list(expanded.values()), self.emphasis)
        encoded = {text: encode(pipe, [full], self.clip_skip, windows, self.emphasis)
                   for text, full in expanded.items()}
        n = len(self.prompts)
        inputs = {call: {'prompt_embeds': torch.cat([encoded[t] for t in per_call[call][:n]]),
                         'negative_prompt_embeds': torch.cat([encoded[t] for t in per_call[call][n:]])}
                  for call in starts}
        return inputs.pop(0), inputs


def edited_prompts(prompt: Union[str, List[str]], negative_prompt: Union[str, List[str], None],
                   clip_skip: Optional[int], emphasis: str = 'Original') -> Optional[EditedPrompts]:
    """`EditedPrompts` when a prompt or negative prompt of the call is edited or a prompt is split by ``AND``,
    else None (the prompts are encoded once)."""
    prompts, negatives = _as_lists(prompt, negative_prompt)
    splits = [editing.split_and(text) for text in prompts]
    if any(splits):
        parts = [(i, text, weight) for i, split in enumerate(splits) for text, weight in split or [(prompts[i], 1.0)]]
        return EditedPrompts([text for _, text, _ in parts], list(negatives), clip_skip,
                             Composition([i for i, _, _ in parts], [weight for _, _, weight in parts]), emphasis)
    if not any(editing.first_edit(text) for text in prompts + negatives):
        return None
    return EditedPrompts(list(prompts), list(negatives), clip_skip, emphasis=emphasis)


def call_arguments(pipe, prompt: str, num_inference_steps: int, num_images_per_prompt: int,
                   clip_skip: Optional[int] = None, negative_prompt: Optional[str] = None):
    """The text arguments of a diffusers text-to-image call with ``pipe``'s scheduler, the prompts read as our
    pipeline reads them, prompt editing and ``AND`` included (the trainers' validation images), and the context to
    make the call in (``AND``'s composed UNet calls, else nothing)."""
    from contextlib import nullcontext
    edited = edited_prompts(prompt, negative_prompt, clip_skip)
    if edited is None:
        return text_inputs(pipe, prompt, negative_prompt, clip_skip), nullcontext()
    first, changes = edited.text_inputs(pipe, model_calls(pipe, num_inference_steps))
    if edited.composition is not None:
        from .composable import composed_call
        return composed_call(pipe, first, changes, edited.composition, num_images_per_prompt)
    switch = SwitchEmbeddings(changes, num_images_per_prompt)
    return ({**first, 'callback_on_step_end': switch, 'callback_on_step_end_tensor_inputs': switch.tensor_inputs},
            nullcontext())


class SwitchEmbeddings:
    """diffusers' ``callback_on_step_end``: after call i, the embeddings of call i + 1 where they change."""
    tensor_inputs = ['prompt_embeds']

    def __init__(self, changes: Dict[int, Dict[str, torch.Tensor]], num_images_per_prompt: int):
        self.changes, self.num_images_per_prompt = changes, num_images_per_prompt

    def __call__(self, pipe, i: int, t, callback_kwargs) -> Dict[str, torch.Tensor]:
        text_inputs = self.changes.get(i + 1)
        if text_inputs is None:
            return {}
        return {'prompt_embeds': unet_embeds(pipe, text_inputs, self.num_images_per_prompt,
                                             pipe.do_classifier_free_guidance)}

