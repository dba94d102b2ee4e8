"""A1111's ``<lora:name:weight>`` tags in prompts, as it reads them: taken out of the text, each sets the weight of
the loaded adapter it names for that call (adapters a prompt does not name keep theirs)."""

import re
from typing import Any, Dict, List, Optional, Tuple

EXTRA_NETWORK = re.compile(r'<(\w+):([^>]+)>')  # A1111's pattern: <lora:name:weight>, <hypernet:name:weight>


def parse(text: str) -> Tuple[str, Dict[str, float]]:
    """A1111's ``<lora:name:weight>`` tags (``<lyco:…>`` too; weight 1 when left out) taken out of ``text``, as
    A1111 takes them out: 'a castle, <lora:detail:0.5>' → ('a castle, ', {'detail': 0.5})."""
    tags: Dict[str, float] = {}
    for match in EXTRA_NETWORK.finditer(text):
        kind, args = match.group(1), match.group(2).split(':')
        if kind not in ('lora', 'lyco'):
            raise ValueError(f'text: {match.group(0)} is an A1111 {kind} network, which this pipeline does not run; '
                             'only <lora:name:weight> tags are read. Take it out of the prompt.')
        if len(args) > 2:
            raise ValueError(f'text: {match.group(0)} gives the text encoder and the UNet weights of their own, '
                             'which this pipeline does not do: write one weight, <lora:name:0.8>.')
        try:
            weight = float(args[1]) if len(args) == 2 else 1.0
        except ValueError:
            raise ValueError(f'text: {match.group(0)}: the weight must be a number, as in <lora:name:0.8>.') from None
        if tags.get(args[0], weight) != weight:
            raise ValueError(f'text names <lora:{args[0]}:…> twice, with weights {tags[args[0]]} and {weight}.')
        tags[args[0]] = weight
    return EXTRA_NETWORK.sub('', text), tags


def call_weights(options: Dict[str, Any], lora_names: List[str], lora_scales: List[float], lora_fused: bool
                 ) -> Tuple[Dict[str, Any], Optional[List[List[float]]]]:
    """A1111's ``<lora:name:weight>`` tags out of the prompts, as adapter weights: adapters a prompt does not
    name keep theirs. Returns the options (with ``lora_scale`` when every prompt asks for the same weights) and,
    when prompts ask for different ones (a weight sweep), the weights of each prompt."""
    prompt = options['prompt']
    prompts = prompt if isinstance(prompt, list) else [prompt]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        return options, None  # check_inputs says what is wrong
    texts, tags = zip(*(parse(p) for p in prompts))
    options = _hires_prompt_tags(options, tags)
    if not any(tags):
        return options, None
    if options['lora_scale'] is not None:
        raise ValueError('Give adapter weights in one place: <lora:name:weight> in the prompt, or lora_scale.')
    for name in {name for named in tags for name in named}:
        if lora_names.count(name) != 1:
            found = 'two adapters' if name in lora_names else 'no adapter'
            loaded = ', '.join(lora_names) or 'none'
            raise ValueError(f'text: <lora:{name}:…> names {found} of those loaded (loaded: {loaded}). Load '
                             f"it with lora_dir='…/{name}.safetensors' when building the pipeline (modelscope-sd "
                             f'generate: --lora …/{name}.safetensors): a tag only sets the weight of an adapter '
                             'loaded there.')
    scales = [[named.get(name, scale) for name, scale in zip(lora_names, lora_scales)] for named in tags]
    options = dict(options, prompt=list(texts) if isinstance(prompt, list) else texts[0])
    changed = [s for s in scales if s != lora_scales]
    if changed and lora_fused:
        raise ValueError(f'<lora:…> tags ask for adapter weights {changed[0]}, but the adapters were fused into '
                         f'the model at {lora_scales} (fast=True or fuse_lora=True). Build the pipeline '
                         f'with lora_scale={changed[0]}, or without fusing to vary the weights per call.')
    if any(s != scales[0] for s in scales):
        return options, scales
    return (dict(options, lora_scale=scales[0]) if changed else options), None


def _hires_prompt_tags(options: Dict[str, Any], tags) -> Dict[str, Any]:
    """``hr_prompt`` without its ``<lora:…>`` tags, which must be its prompt's (``tags``, per prompt): the
    adapter weights hold for both passes here, while A1111 would switch to the hires prompt's for the second
    (turning off adapters it does not name)."""
    hr_prompt = options['hr_prompt']
    hr_prompts = [hr_prompt] * len(tags) if isinstance(hr_prompt, str) else hr_prompt
    if not isinstance(hr_prompts, list) or len(hr_prompts) != len(tags) or not all(
            isinstance(p, str) for p in hr_prompts):
        return options  # None, or check_inputs says what is wrong
    texts, hr_tags = zip(*(parse(p) for p in hr_prompts))
    for own, theirs in zip(tags, hr_tags):
        if own != theirs:
            raise ValueError(f'hr_prompt: its <lora:…> tags {theirs or "(none)"} differ from the prompt\'s '
                             f'{own or "(none)"}. Adapter weights hold for both passes of the hires fix here (A1111 '
                             'would switch to the hires prompt\'s, turning off adapters it does not name): give '
                             'hr_prompt the prompt\'s tags.')
    return dict(options, hr_prompt=texts[0] if isinstance(hr_prompt, str) else list(texts))
