"""LyCORIS LoHa and LoKr files (kohya layer names, LyCORIS factors) load as adapters: the images are those of the
same factors in peft's own LoHa/LoKr layers, and the adapters weigh, take prompt tags and fuse like LoRA ones."""

import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modelscope_sd import StableDiffusionText2ImagePipeline
from modelscope_sd.lycoris import FACTORS

ARGS = dict(num_inference_steps=3, seed=2)
UNET_LAYERS = ['to_q', 'to_k', 'to_v', 'to_out.0', 'proj_in', 'conv1', 'conv2']  # linear, 1x1 and 3x3 convolutions


def _peft_pipe(tiny_model_dir, kind, **config):
    """diffusers' pipeline with a random peft LoHa/LoKr adapter 'x' in its UNet and text encoder."""
    from diffusers import StableDiffusionPipeline
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    make = LoHaConfig if kind == 'LoHa' else LoKrConfig
    pipe.unet.add_adapter(make(target_modules=UNET_LAYERS, init_weights=False, **config), adapter_name='x')
    # transformers' add_adapter wants a newer peft: inject, and register it as diffusers does for LoRA
    text_config = make(target_modules=['q_proj', 'v_proj'], init_weights=False, **config)
    inject_adapter_in_model(text_config, pipe.text_encoder, 'x')
    pipe.text_encoder.peft_config, pipe.text_encoder._hf_peft_config_loaded = {'x': text_config}, True
    torch.manual_seed(0)
    with torch.no_grad():  # LoKr starts w2 at zero even without init: give every factor values
        for component in (pipe.unet, pipe.text_encoder):
            for name, param in component.named_parameters():
                if '.x' in name and ('hada_' in name or 'lokr_' in name):
                    param.normal_(0, 0.3)
    return pipe


def _kohya_file(pipe, kind, path):
    """The adapter as a LyCORIS file names it: kohya's layer names, the factors, and alpha per layer."""
    state = {}
    for component, prefix in ((pipe.unet, 'lora_unet_'), (pipe.text_encoder, 'lora_te_')):
        for name, module in component.named_modules():
            if 'x' not in getattr(module, 'alpha', {}) or not hasattr(module, FACTORS[kind][0]):
                continue
            kohya = prefix + ('' if name.startswith('text_model.') or component is pipe.unet else 'text_model.') + name
            key = kohya.replace('.', '_')
            for param in FACTORS[kind]:
                if 'x' in getattr(module, param):
                    state[f'{key}.{param}'] = getattr(module, param)['x'].detach().clone().contiguous()
            state[f'{key}.alpha'] = torch.tensor(float(module.alpha['x']))
    save_file(state, str(path))
    return state


def _vanilla(pipe, weight=1.0):
    pipe.set_adapters(['x'], adapter_weights=[weight])
    image = pipe('a red house', num_inference_steps=3, output_type='np',
                 generator=[torch.Generator().manual_seed(2)]).images[0]
    return (image * 255).round().astype(int)[..., ::-1]


@pytest.mark.parametrize('kind, config', [('LoHa', dict(r=4, alpha=2)),
                                          ('LoKr', dict(r=2, alpha=4)),  # w1 whole, w2 a product
                                          ('LoKr', dict(r=2, alpha=4, decompose_both=True)),
                                          ('LoKr', dict(r=2, alpha=4, decompose_factor=2)),  # LyCORIS's factor=2
                                          ('LoKr', dict(r=64, alpha=64))])  # both whole: scale 1
def test_lycoris_file_gives_the_image_of_pefts_layers_and_weighs_like_lora(tiny_model_dir, tmp_path, kind, config):
    source = _peft_pipe(tiny_model_dir, kind, **config)
    state = _kohya_file(source, kind, tmp_path / 'style.safetensors')
    first = FACTORS[kind][0] if kind == 'LoHa' or not config.get('decompose_both') else 'lokr_w1_a'
    assert f'lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.{first}' in state
    assert 'lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha' in state
    assert 'lora_unet_down_blocks_0_resnets_0_conv1.alpha' in state
    pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False,
                                             lora_dir=str(tmp_path / 'style.safetensors'))
    got = pipe('a red house', **ARGS)['output_imgs'][0].astype(int)
    plain = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False)
    assert np.abs(got - _vanilla(source)).max() <= 1
    assert np.abs(got - plain('a red house', **ARGS)['output_imgs'][0].astype(int)).max() > 10
    # a weight per call, a prompt tag, and fused into the weights: the weighted adapter's image
    half = _vanilla(source, 0.5)
    assert np.abs(pipe('a red house', lora_scale=0.5, **ARGS)['output_imgs'][0].astype(int) - half).max() <= 1
    assert np.abs(pipe('a red house <lora:style:0.5>', **ARGS)['output_imgs'][0].astype(int) - half).max() <= 1
    fused = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False, fuse_lora=True,
                                              lora_dir=str(tmp_path / 'style.safetensors'), lora_scale=0.5)
    assert np.abs(fused('a red house', **ARGS)['output_imgs'][0].astype(int) - half).max() <= 1


def test_lycoris_files_this_pipeline_does_not_load_say_why(tiny_model_dir, tmp_path):
    source = _peft_pipe(tiny_model_dir, 'LoHa', r=4, alpha=4)
    state = _kohya_file(source, 'LoHa', tmp_path / 'loha.safetensors')
    key = 'lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q'
    cases = {
        'tucker': ({**state, f'{key}.hada_t1': torch.zeros(4, 4, 3, 3)}, "holds ['hada_t1'] (Tucker"),
        'other model': ({**state, 'lora_unet_down_blocks_7_resnets_0_conv1.hada_w1_a': torch.zeros(4, 4),
                         'lora_unet_down_blocks_7_resnets_0_conv1.hada_w1_b': torch.zeros(4, 4)},
                        'not in this model (e.g. down_blocks_7_resnets_0_conv1)'),
        'shape': ({**state, f'{key}.hada_w1_a': torch.zeros(7, 4)}, 'to_q.hada_w1_a has shape (7, 4)'),
        # a 64×64 layer's outputs split as a factor of 2 splits them, its inputs as 8 (or the default) does
        'lokr factor': ({f'{key}.lokr_w1': torch.zeros(2, 8), f'{key}.lokr_w2': torch.zeros(32, 8)},
                        'splits its layers\' sizes in a way (LyCORIS factor)'),
        'ia3': ({f'{key}.on_input': torch.zeros(4)}, 'is a LyCORIS (IA)^3 adapter'),
    }
    for name, (weights, words) in cases.items():
        path = str(tmp_path / f'{name}.safetensors')
        save_file(weights, path)
        with pytest.raises(ValueError, match=re.escape(words)):
            StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', lora_dir=path)
