"""LyCORIS LoHa and LoKr adapters (kohya/A1111 files, common on civitai), which diffusers does not load, as peft
adapters: they then weigh, switch, take ``<lora:name:weight>`` tags and fuse through diffusers as LoRA ones do.

A file names each layer as kohya does (``lora_unet_down_blocks_0_..._to_q``, ``lora_te_text_model_..._q_proj``)
and holds LyCORIS's factors, which are peft's: LoHa ``ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha / r``, LoKr
``ΔW = w1 ⊗ w2`` (either factor whole or as a product) ``· alpha / r``, or 1 when both are whole.
"""

from collections import defaultdict
from typing import Dict, Optional

import torch

# a key suffix of each kind, and the factors each kind's layers hold
KINDS = {'.hada_w1_a': 'LoHa', '.lokr_w1': 'LoKr', '.lokr_w1_a': 'LoKr'}
FACTORS = {'LoHa': ('hada_w1_a', 'hada_w1_b', 'hada_w2_a', 'hada_w2_b'),
           'LoKr': ('lokr_w1', 'lokr_w1_a', 'lokr_w1_b', 'lokr_w2', 'lokr_w2_a', 'lokr_w2_b')}
# LyCORIS's Tucker-decomposed convolutions, DoRA's magnitudes and per-layer scalars peft's layers do not hold
UNSUPPORTED = ('.hada_t1', '.hada_t2', '.lokr_t2', '.dora_scale', '.scalar')
PREFIXES = {'lora_unet_': 'unet', 'lora_te_': 'text_encoder'}


class LycorisError(ValueError):
    """A LoHa/LoKr file this pipeline does not load, with the reason."""


def lycoris_kind(keys) -> Optional[str]:
    """'LoHa' or 'LoKr' for a LyCORIS file of that kind, else None."""
    kinds = {kind for key in keys for suffix, kind in KINDS.items() if key.endswith(suffix)}
    if len(kinds) > 1:
        raise LycorisError(f'a file with both {" and ".join(sorted(kinds))} layers is not a LyCORIS adapter this '
                           'pipeline loads.')
    return kinds.pop() if kinds else None


def load_lycoris(pipe, path: str, adapter_name: str) -> None:
    """Add the LoHa/LoKr file at ``path`` to ``pipe``'s UNet and text encoder as peft adapter ``adapter_name``."""
    from safetensors.torch import load_file
    state = load_file(path)
    kind = lycoris_kind(state)
    unsupported = sorted({k.rsplit('.', 1)[-1] for k in state if k.endswith(UNSUPPORTED)})
    if unsupported:
        raise LycorisError(f'lora_dir={path!r}: this {kind} file holds {unsupported} (Tucker-decomposed '
                           'convolutions, DoRA or per-layer scalars), which are not loaded here.')
    layers: Dict[str, Dict[str, Dict[str, torch.Tensor]]] = defaultdict(dict)
    for key, tensor in state.items():
        layer, _, param = key.partition('.')
        prefix = next((p for p in PREFIXES if layer.startswith(p)), None)
        if prefix is not None:
            layers[PREFIXES[prefix]].setdefault(layer[len(prefix):], {})[param] = tensor
    if not layers:
        raise LycorisError(f'lora_dir={path!r}: no lora_unet_/lora_te_ layers in this {kind} file.')
    for component, found in layers.items():
        _add(getattr(pipe, component), found, kind, adapter_name, path)


def _module_names(model) -> Dict[str, str]:
    """kohya's name of each module (dots as underscores) → its name; text encoders without transformers'
    ``text_model.`` level answer to the kohya names that have it."""
    names = {}
    for name, _ in model.named_modules():
        names[name.replace('.', '_')] = name
        names.setdefault('text_model_' + name.replace('.', '_'), name)
    return names


def _add(model, layers: Dict[str, Dict[str, torch.Tensor]], kind: str, adapter_name: str, path: str) -> None:
    from peft import LoHaConfig, LoKrConfig
    names = _module_names(model)
    unknown = sorted(layer for layer in layers if layer not in names)
    if unknown:
        raise LycorisError(f'lora_dir={path!r}: {len(unknown)} layer(s) of this {kind} file are not in this model '
                           f'(e.g. {unknown[0]}): it was trained for another model family.')
    targets, ranks, alphas = [], {}, {}
    for layer, params in layers.items():
        name = names[layer]
        rank, alpha = _rank_and_alpha(kind, params, model.get_submodule(name))
        targets.append(name)
        ranks[name], alphas[name] = rank, alpha
    # per layer: a pattern key is a regex that peft matches against the end of a module's name
    patterns = {'rank_pattern': {_escape(n): r for n, r in ranks.items()},
                'alpha_pattern': {_escape(n): a for n, a in alphas.items()}}
    first = next(iter(ranks))
    if kind == 'LoHa':
        config = LoHaConfig(r=ranks[first], alpha=alphas[first], target_modules=targets, **patterns)
    else:
        decompose_both = any('lokr_w1_a' in params for params in layers.values())
        config = LoKrConfig(r=ranks[first], alpha=alphas[first], target_modules=targets,
                            decompose_both=decompose_both, decompose_factor=_lokr_factor(model, layers, names, path),
                            **patterns)
    add_adapter(model, config, adapter_name)
    with torch.no_grad():
        for layer, params in layers.items():
            module = model.get_submodule(names[layer])
            for param in FACTORS[kind]:
                held = getattr(module, param)
                if (param in params) != (adapter_name in held):
                    raise LycorisError(f'lora_dir={path!r}: layer {layer} of this {kind} file factors its weight in '
                                       'a layout (LyCORIS factor) that peft does not make, which is not loaded here.')
                if param in params:
                    target = held[adapter_name]
                    if tuple(target.shape) != tuple(params[param].shape):
                        raise LycorisError(f'lora_dir={path!r}: {layer}.{param} has shape {tuple(params[param].shape)}'
                                           f'; this model\'s layer takes {tuple(target.shape)}.')
                    target.copy_(params[param].to(target.dtype))


def add_adapter(model, config, adapter_name: str) -> None:
    """peft's layers for ``config`` in ``model`` (a UNet or a text encoder), registered as diffusers registers
    its LoRA adapters, so that its set_adapters, fuse_lora and unload_lora_weights reach them."""
    from peft import inject_adapter_in_model
    inject_adapter_in_model(config, model, adapter_name)
    if not isinstance(getattr(model, 'peft_config', None), dict):
        model.peft_config = {}
    model.peft_config[adapter_name] = config
    model._hf_peft_config_loaded = True


def _rank_and_alpha(kind: str, params: Dict[str, torch.Tensor], module):
    """peft's r and alpha for a layer: its scale alpha / r is LyCORIS's."""
    if kind == 'LoHa':
        rank = params['hada_w1_b'].shape[0]
    elif 'lokr_w2_a' in params or 'lokr_w1_a' in params:
        rank = (params.get('lokr_w2_a') if 'lokr_w2_a' in params else params['lokr_w1_a']).shape[1]
    else:  # both factors whole: LyCORIS scales by 1; an r this large makes peft keep them whole too
        rank = max(module.weight.shape[:2])
        return rank, float(rank)
    alpha = float(params['alpha']) if 'alpha' in params else float(rank)
    return rank, alpha


def _lokr_factor(model, layers: Dict[str, Dict[str, torch.Tensor]], names: Dict[str, str], path: str) -> int:
    """The factor (LyCORIS's ``factor`` network arg, one for the whole file) that splits each layer's sizes as the
    file's first Kronecker factors are split: -1 (LyCORIS's default, near the square root) or a size they show."""
    from peft.tuners.lokr.layer import factorization
    splits = []  # (out size, in size) of the layer → the first factor's (out, in) in the file
    for layer, params in layers.items():
        module = model.get_submodule(names[layer])
        sizes = ((module.out_features, module.in_features) if isinstance(module, torch.nn.Linear)
                 else (module.out_channels, module.in_channels // module.groups))
        out_l = (params['lokr_w1'] if 'lokr_w1' in params else params['lokr_w1_a']).shape[0]
        in_m = (params['lokr_w1'] if 'lokr_w1' in params else params['lokr_w1_b']).shape[1]
        splits.append((sizes, (out_l, in_m)))
    shown = sorted({size for _, factor in splits for size in factor})
    for factor in [-1] + shown:
        if all((factorization(sizes[0], factor)[0], factorization(sizes[1], factor)[0]) == first
               for sizes, first in splits):
            return factor
    raise LycorisError(f'lora_dir={path!r}: this LoKr file splits its layers\' sizes in a way (LyCORIS factor) that '
                       'peft\'s LoKr layers do not make, which is not loaded here.')


def _escape(name: str) -> str:
    return name.replace('.', r'\.')
