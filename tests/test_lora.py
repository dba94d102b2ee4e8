"""Pipeline side of LoRA: lora_dir, scales, several adapters, fusing, kohya files, clear errors."""

import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from modelscope_sd import StableDiffusionText2ImagePipeline
from train_helpers import make_random_lora

STEPS = dict(num_inference_steps=2, seed=0)


@pytest.fixture(scope='module')
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp('adapters')
    first = make_random_lora(tiny_model_dir, str(root / 'a'), seed=1, text_encoder=True)
    second = make_random_lora(tiny_model_dir, str(root / 'b'), seed=2)
    return os.path.dirname(first), os.path.dirname(second)


def _image(pipe, **kwargs):
    return pipe('a cat', **STEPS, **kwargs)['output_imgs'][0].astype(int)


def _pipe(model_dir, **kwargs):
    return StableDiffusionText2ImagePipeline(model_dir, device='cpu', progress_bar=False, **kwargs)


def test_lora_dir_changes_the_image_and_matches_vanilla_diffusers(tiny_model_dir, adapters, sd_pipe, vanilla_pipe):
    ours = _image(_pipe(tiny_model_dir, lora_dir=adapters[0]))
    assert np.abs(ours - _image(sd_pipe)).max() > 10
    vanilla_pipe.load_lora_weights(adapters[0])
    try:
        images = vanilla_pipe('a cat', num_inference_steps=2, output_type='np',
                              generator=[torch.Generator('cpu').manual_seed(0)]).images
    finally:
        vanilla_pipe.unload_lora_weights()
    expected = (images[0] * 255).round().astype(int)[..., ::-1]
    assert np.abs(ours - expected).max() <= 1


def test_a_unet_only_adapter_loads_without_diffusers_text_encoder_notice(tiny_model_dir, adapters, diffusers_caplog):
    """diffusers says of every adapter without text-encoder weights that it found none, and to open an issue."""
    with diffusers_caplog.at_level('WARNING'):
        _pipe(tiny_model_dir, lora_dir=adapters[1])  # the trainers' default: UNet weights only
    assert 'No LoRA keys' not in diffusers_caplog.text


def test_call_time_scale_and_restore(tiny_model_dir, adapters, sd_pipe):
    pipe = _pipe(tiny_model_dir, lora_dir=adapters[0])
    full = _image(pipe)
    assert np.abs(_image(pipe, lora_scale=0.0) - _image(sd_pipe)).max() <= 1  # scale 0 is the base model
    assert np.abs(_image(pipe, lora_scale=0.5) - full).max() > 0
    assert np.array_equal(_image(pipe), full)  # the loaded scale is back after the call


def test_several_adapters_with_weights(tiny_model_dir, adapters, recwarn):
    both = _image(_pipe(tiny_model_dir, lora_dir=list(adapters), lora_scale=[1.0, 1.0]))
    assert not [w for w in recwarn if 'peft_config' in str(w.message)]  # peft's warning for a deliberate second
    first_only = _image(_pipe(tiny_model_dir, lora_dir=list(adapters), lora_scale=[1.0, 0.0]))
    alone = _image(_pipe(tiny_model_dir, lora_dir=adapters[0]))
    assert np.abs(first_only - alone).max() <= 1
    assert np.abs(both - alone).max() > 0


def test_fused_equals_unfused(tiny_model_dir, adapters):
    unfused = _image(_pipe(tiny_model_dir, lora_dir=adapters[0], lora_scale=0.7))
    fused_pipe = _pipe(tiny_model_dir, lora_dir=adapters[0], lora_scale=0.7, fuse_lora=True)
    assert np.abs(_image(fused_pipe) - unfused).max() <= 2
    with pytest.raises(ValueError, match='fused'):
        fused_pipe('a', lora_scale=0.5)
    fast_pipe = _pipe(tiny_model_dir, lora_dir=adapters[0], lora_scale=0.7, fast=True)  # compiles on first call only
    with pytest.raises(ValueError, match='with fast=True.*build it without fast=True'):
        fast_pipe('a', lora_scale=0.5)


def test_a1111_lora_tags_set_the_weights_of_loaded_adapters_for_the_call(tiny_model_dir, adapters):
    """A prompt pasted from A1111 or civitai carries <lora:name:weight>: the tag leaves the prompt, and the adapter
    of that name (file or folder name) takes that weight for the call; the others keep theirs."""
    pipe = _pipe(tiny_model_dir, lora_dir=list(adapters), lora_scale=[1.0, 0.8])
    assert pipe.lora_names == ['a', 'b']
    tagged = pipe('<lora:b:0.3>a cat', **STEPS)['output_imgs'][0].astype(int)
    assert np.array_equal(tagged, _image(pipe, lora_scale=[1.0, 0.3]))
    assert np.abs(tagged - _image(pipe)).max() > 0
    assert np.array_equal(pipe(['<lora:a>a cat'] * 2, **STEPS)['output_imgs'][0].astype(int), _image(pipe))
    for prompt, kwargs, message in [
            ('<lora:c:0.5>a cat', {}, 'names no adapter of those loaded \\(loaded: a, b\\).*lora_dir='),
            ('<lora:a:0.5>a cat', {'lora_scale': 0.5}, 'in one place'),
            ('a cat', {'negative_prompt': '<lora:a:-1>'}, 'negative_prompt: <lora:a:-1>: A1111 network tags go in the text'),
            ('<lora:a:0.5:0.2>a cat', {}, 'text encoder and the UNet weights'),
            ('<hypernet:anime:1>a cat', {}, 'hypernet network.*Take it out')]:
        with pytest.raises(ValueError, match=message):
            pipe(prompt, **STEPS, **kwargs)
    # a weight sweep in one call (a prompt file of A1111 prompts): each prompt its weights, the call's seeds
    sweep = pipe(['<lora:b:0.3>a cat', '<lora:b:0.3>a cat', 'a cat', '<lora:a:0.5>a cat'], **STEPS, batch_size=3)
    assert sweep['seeds'] == [0, 1, 2, 3]
    for image, seed, scale in zip(sweep['output_imgs'], sweep['seeds'], ([1.0, 0.3], [1.0, 0.3], None, [0.5, 0.8])):
        alone = pipe('a cat', num_inference_steps=2, seed=seed, lora_scale=scale)['output_imgs'][0]
        assert np.abs(image.astype(int) - alone.astype(int)).max() <= 1, scale
    fused = _pipe(tiny_model_dir, lora_dir=adapters[0], fuse_lora=True)  # weights fixed: only the fused one fits
    assert np.array_equal(fused('<lora:a:1>a cat', **STEPS)['output_imgs'][0].astype(int), _image(fused))
    with pytest.raises(ValueError, match='fused into the model at \\[1.0\\].*lora_scale=\\[0.5\\]'):
        fused('<lora:a:0.5>a cat', **STEPS)


def test_kohya_file_loads_with_the_same_effect(tiny_model_dir, adapters, tmp_path):
    from finetune.models import export_kohya_lora
    kohya = export_kohya_lora(os.path.join(adapters[0], 'pytorch_lora_weights.safetensors'),
                              str(tmp_path / 'kohya.safetensors'))
    keys = list(load_file(kohya))
    assert all(k.startswith(('lora_unet_', 'lora_te_text_model_')) for k in keys)
    assert all(k.endswith(('.lora_down.weight', '.lora_up.weight', '.alpha')) for k in keys)
    assert np.abs(_image(_pipe(tiny_model_dir, lora_dir=kohya))
                  - _image(_pipe(tiny_model_dir, lora_dir=adapters[0]))).max() <= 1


def test_adapter_for_another_base_is_refused(tiny_model_dir, adapters, tmp_path):
    state = load_file(os.path.join(adapters[1], 'pytorch_lora_weights.safetensors'))
    key = next(k for k in state if 'lora_A' in k or 'lora.down' in k)
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 16)  # another model's width
    save_file(state, str(tmp_path / 'other.safetensors'))
    with pytest.raises(ValueError, match='could not be loaded into this model'):
        _pipe(tiny_model_dir, lora_dir=str(tmp_path / 'other.safetensors'))


def test_folder_without_adapter(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match='holds no LoRA adapter'):
        _pipe(tiny_model_dir, lora_dir=str(tmp_path))


def test_an_embedding_as_lora_dir_is_refused_by_name(tiny_model_dir, tmp_path):
    save_file({'emb_params': torch.zeros(2, 32)}, str(tmp_path / 'EasyNegative.safetensors'))
    with pytest.raises(ValueError, match="holds \\['emb_params'\\], as a textual-inversion embedding does.*"
                                         "textual_inversion="):
        _pipe(tiny_model_dir, lora_dir=str(tmp_path / 'EasyNegative.safetensors'))


def test_a_whole_model_as_lora_dir_is_refused_by_name(tiny_model_dir, tiny_single_file):
    with pytest.raises(ValueError, match='is a whole Stable Diffusion model.*not a LoRA adapter'):
        _pipe(tiny_model_dir, lora_dir=tiny_model_dir)
    with pytest.raises(ValueError, match='is a whole single-file model checkpoint, not a LoRA adapter'):
        _pipe(tiny_model_dir, lora_dir=tiny_single_file)


@pytest.mark.parametrize('kind, tensors', [
    ('LoHa', ('hada_w1_a', 'hada_w1_b', 'hada_w2_a', 'hada_w2_b')),  # LyCORIS' names, as civitai files hold them
    ('LoKr', ('lokr_w1', 'lokr_w2_a', 'lokr_w2_b')),
    ('OFT', ('oft_blocks',)),
    ('GLoRA', ('a1.weight', 'a2.weight', 'b1.weight', 'b2.weight')),
])
def test_lycoris_kinds_that_do_not_load_are_refused_by_kind(tiny_model_dir, tmp_path, kind, tensors):
    """The pipeline loads LoHa and LoKr (test_lycoris.py) but not OFT or GLoRA; the trainers' --network_weights
    and convert-lora take LoRA and LoCon files only."""
    from finetune.models import import_kohya_lora
    key = 'lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q'
    state = {f'{key}.{name}': torch.ones(4, 4) for name in tensors}
    path = str(tmp_path / 'adapter.safetensors')
    save_file({**state, f'{key}.alpha': torch.tensor(4.0)}, path)
    with pytest.raises(ValueError, match=f'is a LyCORIS {kind} adapter; LoRA and LoCon files load here'):
        import_kohya_lora(path, str(tmp_path / 'out'))
    if kind not in ('LoHa', 'LoKr'):
        with pytest.raises(ValueError, match=f'is a LyCORIS {kind} adapter; LoRA, LoCon, LoHa and LoKr files load'):
            _pipe(tiny_model_dir, lora_dir=path)


def test_modelscope_old_trainer_bin_adapter_loads_with_allow_pickle(tiny_model_dir, adapters, sd_pipe, tmp_path):
    """ModelScope's old LoRA trainer saved ``unet.save_attn_procs``: a pickle ``pytorch_lora_weights.bin`` with
    attention-processor keys (``attn1.processor.to_q_lora.down.weight``)."""
    state = load_file(os.path.join(adapters[1], 'pytorch_lora_weights.safetensors'))  # UNet only, alpha = rank
    old = {}
    for key, value in state.items():
        module, kind = key[len('unet.'):].split('.lora_')
        attention, projection = module.split('.to_')
        old[f"{attention}.processor.to_{projection.split('.')[0]}_lora.{'down' if kind[0] == 'A' else 'up'}.weight"] = value
    torch.save(old, tmp_path / 'pytorch_lora_weights.bin')
    with pytest.raises(ValueError, match='holds a pickle file.*allow_pickle=True'):
        _pipe(tiny_model_dir, lora_dir=str(tmp_path))
    loaded = _image(_pipe(tiny_model_dir, lora_dir=str(tmp_path), allow_pickle=True))
    assert np.abs(loaded - _image(_pipe(tiny_model_dir, lora_dir=adapters[1]))).max() <= 1
    assert np.abs(loaded - _image(sd_pipe)).max() > 10
    # converted once (with the same opt-in) it is a .safetensors adapter like any other, for both formats
    from modelscope_sd.cli import main
    old_file = str(tmp_path / 'pytorch_lora_weights.bin')
    with pytest.raises(SystemExit):
        main(['convert-lora', old_file, str(tmp_path / 'no.safetensors'), '--to', 'diffusers'])
    for to in ('diffusers', 'kohya'):
        main(['convert-lora', old_file, str(tmp_path / f'{to}.safetensors'), '--to', to, '--allow_pickle'])
        converted = _image(_pipe(tiny_model_dir, lora_dir=str(tmp_path / f'{to}.safetensors')))
        assert np.abs(converted - loaded).max() <= 1
    # the trainers start from the converted file, and say how to make it
    from finetune.config import LoraTrainConfig
    with pytest.raises(ValueError, match=re.escape('is a pickle file (pytorch_lora_weights.bin)') + '.*'
                       + re.escape('convert-lora') + '.*--allow_pickle, then pass --network_weights'):
        LoraTrainConfig(dataset_name='test/x', network_weights=str(tmp_path), rank=4)
    assert LoraTrainConfig(dataset_name='test/x', network_weights=str(tmp_path / 'diffusers.safetensors'),
                           rank=4).network_weights


def test_missing_lora_dir(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match='lora_dir='):
        _pipe(tiny_model_dir, lora_dir=str(tmp_path / 'nope'))


def test_wrong_number_of_scales(tiny_model_dir, adapters):
    with pytest.raises(ValueError, match='lora_scale=.*2 numbers'):
        _pipe(tiny_model_dir, lora_dir=list(adapters), lora_scale=[1.0])
    with pytest.raises(ValueError, match='lora_scale=.*finite'):
        _pipe(tiny_model_dir, lora_dir=list(adapters), lora_scale=[1.0, float('nan')])


def test_lora_through_modelscope_pipeline(tiny_model_dir, adapters):
    import modelscope_sd  # noqa: F401
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    pipe = pipeline(task=Tasks.text_to_image_synthesis, model=tiny_model_dir, device='cpu', lora_dir=adapters[0])
    assert pipe.adapters == ['lora_0']


def test_export_command_writes_a_kohya_file_that_loads(tiny_model_dir, adapters, tmp_path):
    from finetune.export_kohya import main
    target = main([adapters[1], str(tmp_path / 'mine.safetensors')])
    assert np.abs(_image(_pipe(tiny_model_dir, lora_dir=target))
                  - _image(_pipe(tiny_model_dir, lora_dir=adapters[1]))).max() <= 1
    with pytest.raises(SystemExit):  # a file named on the command line is never written over
        main([adapters[0], target])
    assert np.abs(_image(_pipe(tiny_model_dir, lora_dir=target))
                  - _image(_pipe(tiny_model_dir, lora_dir=adapters[1]))).max() <= 1
