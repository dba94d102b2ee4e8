"""LoRA trainer on the tiny model: it learns, resumes exactly, survives kills, and refuses bad input."""

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.config import LoraTrainConfig
from finetune.flags import parse_args
from train_helpers import (REPO, Killed, at_loss_calls, kill_at_loss_call, make_images, make_modelscope_csv_dataset,
                           reset_accelerate, run_launcher, signal_at_loss_calls)



pytestmark = pytest.mark.usefixtures('fresh_accelerate')


@pytest.fixture(scope='module')
def csv_dataset(tmp_path_factory):
    return make_modelscope_csv_dataset(str(tmp_path_factory.mktemp('data') / 'lora-data'))


def _config(model, data, out, **kwargs):
    defaults = dict(pretrained_model_name_or_path=model, dataset_name=data, output_dir=str(out), resolution=32,
                    max_train_steps=4, checkpointing_steps=2, learning_rate=1e-3, seed=3)
    return LoraTrainConfig(**{**defaults, **kwargs})


def _train(config):
    from finetune.train_lora import main
    reset_accelerate()
    return main(config)


@pytest.mark.parametrize('lora', [True, False])
def test_frozen_weights_take_the_compute_precision_and_trained_ones_stay_fp32(tiny_model_dir, csv_dataset, tmp_path,
                                                                              lora, diffusers_caplog):
    from types import SimpleNamespace

    from finetune.models import load_components
    from finetune.training import prepare_models
    accelerator = SimpleNamespace(mixed_precision='bf16', device=torch.device('cpu'),
                                  register_save_state_pre_hook=lambda hook: None,
                                  register_load_state_pre_hook=lambda hook: None)
    parts = load_components(tiny_model_dir, None)
    prepare_models(accelerator, _config(tiny_model_dir, csv_dataset, tmp_path), parts, lora=lora)
    dtypes = {name: {p.dtype for p in parts[name].parameters()} for name in ('unet', 'vae', 'text_encoder')}
    assert dtypes['vae'] == dtypes['text_encoder'] == {torch.bfloat16}
    assert dtypes['unet'] == ({torch.bfloat16, torch.float32} if lora else {torch.float32})  # LoRA: adapters fp32
    assert 'should be kept in float32' not in diffusers_caplog.text  # diffusers warns on any cast, models with none too


@pytest.mark.parametrize('use_dora', [False, True])
def test_under_autocast_lora_inputs_skip_pefts_fp32_round_trip_and_learn_the_same_adapter(
        tiny_model_dir, csv_dataset, tmp_path, monkeypatch, use_dora):
    """peft casts a LoRA layer's bf16 input to the adapter's fp32 and autocast casts it back: two copies per layer in
    each forward (and their backward), launches that bound SD1.5's LoRA step on an H200. Skipping them must change
    no number of the trained adapter; DoRA's, which the cast does change, keeps it."""
    import contextlib
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    import finetune.models
    import finetune.training

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                counts[(args[0].dtype, (kwargs or {}).get('dtype'))] += 1
            return func(*args, **(kwargs or {}))

    def counted(*args, **kwargs):
        with Casts():
            return loss(*args, **kwargs)

    loss = finetune.training.denoising_loss
    monkeypatch.setattr(finetune.training, 'denoising_loss', counted)
    runs = {}
    for uncast in (True, False):
        counts = Counter()
        if not uncast:  # peft's default
            monkeypatch.setattr(finetune.models, 'lora_inputs_uncast', lambda *a: contextlib.nullcontext())
        path = _train(_config(tiny_model_dir, csv_dataset, tmp_path / str(uncast), mixed_precision='bf16',
                              max_train_steps=2, checkpointing_steps=None, train_text_encoder=True, use_dora=use_dora))
        runs[uncast] = load_file(path), counts
    (ours, ours_casts), (default, default_casts) = runs[True], runs[False]
    assert ours.keys() == default.keys() and all(torch.equal(ours[k], default[k]) for k in ours)
    up, down = (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)
    skipped = default_casts[up] - ours_casts[up]
    if use_dora:
        assert skipped == 0
    else:  # each bf16 input skips peft's cast up and autocast's cast back down, and nothing else changes
        assert skipped > 0 and default_casts[down] - ours_casts[down] == skipped
        assert sum(default_casts.values()) - sum(ours_casts.values()) == 2 * skipped


def test_trained_adapter_loads_in_our_pipeline_and_in_vanilla_diffusers(tiny_model_dir, csv_dataset, tmp_path):
    from diffusers import StableDiffusionPipeline

    from modelscope_sd import StableDiffusionText2ImagePipeline
    path = _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'out', learning_rate=5e-2, train_text_encoder=True,
                          validation_prompt='a photo', validation_steps=2))
    with safe_open(path, framework='pt') as f:
        meta = f.metadata()
    assert meta['modelscope_sd.rank'] == '4' and meta['modelscope_sd.base_model'] == tiny_model_dir
    assert sorted(os.listdir(tmp_path / 'out' / 'validation')) == ['step-000002-0.png', 'step-000004-0.png']
    base = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False)
    ours = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False,
                                             lora_dir=str(tmp_path / 'out'))
    args = dict(num_inference_steps=2, seed=0)
    mine = ours('a photo', **args)['output_imgs'][0].astype(int)
    assert np.abs(mine - base('a photo', **args)['output_imgs'][0].astype(int)).max() > 0
    vanilla = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    vanilla.load_lora_weights(str(tmp_path / 'out'))
    image = vanilla('a photo', num_inference_steps=2, output_type='np',
                    generator=[torch.Generator().manual_seed(0)]).images[0]
    assert np.abs(mine - (image * 255).round().astype(int)[..., ::-1]).max() <= 1


def test_loss_goes_down_when_overfitting_one_image(tiny_model_dir, tmp_path):
    from finetune.data import CaptionDataset, load_records
    from finetune.models import load_components
    from finetune.training import validation_loss
    make_images(str(tmp_path / 'one'), count=1)
    records = load_records(str(tmp_path / 'one'))

    def loss_with(lora_dir):
        from accelerate import Accelerator
        parts = load_components(tiny_model_dir, None)
        if lora_dir:
            from diffusers import StableDiffusionPipeline
            pipe = StableDiffusionPipeline(**{k: parts[k] for k in ('unet', 'vae', 'text_encoder', 'tokenizer')},
                                           scheduler=parts['noise_scheduler'], safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
            pipe.load_lora_weights(lora_dir)
        reset_accelerate()
        config = _config(tiny_model_dir, 'test/unused', tmp_path, train_batch_size=1)
        dataset = CaptionDataset(records * 8, parts['tokenizer'], 32, center_crop=True)
        return validation_loss(Accelerator(), config, parts, dataset)

    before = loss_with(None)
    # every conv and attention projection of the tiny UNet, so its few weights can memorise one image
    _train(_config(tiny_model_dir, None, tmp_path / 'out', train_data_dir=str(tmp_path / 'one'), rank=8,
                   center_crop=True, max_train_steps=80, learning_rate=1e-2, checkpointing_steps=None,
                   target_modules='to_k,to_q,to_v,to_out.0,conv1,conv2,conv_in,conv_out,proj_in,proj_out'))
    after = loss_with(str(tmp_path / 'out'))
    print(f'denoising loss on the image: {before:.4f} before, {after:.4f} after')
    assert after < 0.8 * before, (before, after)


RESUME_SETTINGS = dict(max_train_steps=6, checkpointing_steps=2, lr_scheduler='linear', random_flip=True,
                       gradient_accumulation_steps=2, lora_dropout=0.1, train_text_encoder=True)


@pytest.fixture(scope='module')
def uninterrupted(tiny_model_dir, csv_dataset, tmp_path_factory):
    """The adapter of a run with RESUME_SETTINGS that nothing stopped."""
    return load_file(_train(_config(tiny_model_dir, csv_dataset, tmp_path_factory.mktemp('a'), **RESUME_SETTINGS)))


def _assert_same_adapter(adapter, reference):
    assert reference.keys() == adapter.keys()
    for key in reference:
        torch.testing.assert_close(adapter[key], reference[key], rtol=1e-5, atol=1e-6)


def test_resume_after_a_kill_matches_an_uninterrupted_run(tiny_model_dir, csv_dataset, tmp_path, monkeypatch,
                                                          uninterrupted):
    settings = RESUME_SETTINGS
    revive = kill_at_loss_call(monkeypatch, 7)  # the first micro-batch of optimizer step 4
    with pytest.raises(Killed):
        _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'b', **settings))
    revive()
    assert sorted(os.listdir(tmp_path / 'b')) == ['checkpoint-2']
    resumed = load_file(_train(_config(tiny_model_dir, csv_dataset, tmp_path / 'b', resume_from_checkpoint='latest',
                                       **settings)))
    _assert_same_adapter(resumed, uninterrupted)


def test_checkpoints_written_before_they_held_the_adapter_file_still_resume(tiny_model_dir, csv_dataset, tmp_path,
                                                                            monkeypatch, uninterrupted):
    """Earlier versions wrote unet_lora.safetensors and text_encoder_lora.safetensors (peft keys as the models
    name them) instead of pytorch_lora_weights.safetensors."""
    from safetensors.torch import save_file
    revive = kill_at_loss_call(monkeypatch, 7)
    with pytest.raises(Killed):
        _train(_config(tiny_model_dir, csv_dataset, tmp_path, **RESUME_SETTINGS))
    revive()
    checkpoint = tmp_path / 'checkpoint-2'
    saved = load_file(str(checkpoint / 'pytorch_lora_weights.safetensors'))
    for role in ('unet', 'text_encoder'):
        save_file({k[len(role) + 1:].removeprefix('text_model.'): v for k, v in saved.items() if k.startswith(role)},
                  str(checkpoint / f'{role}_lora.safetensors'))
    os.remove(checkpoint / 'pytorch_lora_weights.safetensors')
    resumed = load_file(_train(_config(tiny_model_dir, csv_dataset, tmp_path, resume_from_checkpoint='latest',
                                       **RESUME_SETTINGS)))
    _assert_same_adapter(resumed, uninterrupted)


def test_ctrl_c_saves_a_checkpoint_where_the_run_stands_and_resuming_matches(tiny_model_dir, csv_dataset, tmp_path,
                                                                           monkeypatch, uninterrupted):
    from finetune.interrupt import TrainingInterrupted
    before = signal.getsignal(signal.SIGINT)
    # in the first micro-batch of optimizer step 3, twice at once: a launcher forwarding the terminal's Ctrl-C
    signal_at_loss_calls(monkeypatch, signal.SIGINT, [5, 5])
    with pytest.raises(TrainingInterrupted) as stopped:
        _train(_config(tiny_model_dir, csv_dataset, tmp_path, **RESUME_SETTINGS))
    assert (stopped.value.code, stopped.value.step) == (130, 3)  # step 3 finished, then saved
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-2', 'checkpoint-3']
    assert signal.getsignal(signal.SIGINT) is before
    monkeypatch.undo()
    resumed = load_file(_train(_config(tiny_model_dir, csv_dataset, tmp_path, resume_from_checkpoint='latest',
                                       **RESUME_SETTINGS)))
    _assert_same_adapter(resumed, uninterrupted)


def test_trainer_takes_back_the_stop_signals_its_launcher_ignores(tiny_model_dir, csv_dataset, tmp_path):
    """The launchers start accelerate with SIGINT and SIGTERM ignored (so it waits for the save), which its
    child inherits."""
    stops = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, signal.SIG_IGN) for s in stops}
    try:
        _train(_config(tiny_model_dir, csv_dataset, tmp_path, max_train_steps=1, checkpointing_steps=None))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        for s in stops:
            signal.signal(s, before[s])


def test_enable_bucket_trains_each_image_at_its_bucket_size_and_resumes_exactly(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    import finetune.training as training
    data = tmp_path / 'images'
    data.mkdir()
    for i, size in enumerate([(80, 30), (90, 30), (30, 80), (30, 90)]):
        Image.new('RGB', size, (60 * i, 100, 200)).save(data / f'img{i}.png')
        (data / f'img{i}.txt').write_text(f'a photo {i}')
    settings = dict(enable_bucket=True, train_batch_size=2, max_train_steps=4, checkpointing_steps=3)
    shapes, real_loss = [], training.denoising_loss
    monkeypatch.setattr(training, 'denoising_loss', lambda *a, **kw: shapes.append(a[4]['pixel_values'].shape)
                        or real_loss(*a, **kw))
    reference = load_file(_train(_config(tiny_model_dir, str(data), tmp_path / 'a', **settings)))
    assert {tuple(s) for s in shapes} == {(2, 3, 16, 48), (2, 3, 48, 16)}  # landscapes and portraits, uncropped
    monkeypatch.undo()
    revive = kill_at_loss_call(monkeypatch, 4)  # in step 4: resume from step 3, one batch into the second epoch
    with pytest.raises(Killed):
        _train(_config(tiny_model_dir, str(data), tmp_path / 'b', **settings))
    revive()
    resumed = load_file(_train(_config(tiny_model_dir, str(data), tmp_path / 'b', resume_from_checkpoint='latest',
                                       **settings)))
    _assert_same_adapter(resumed, reference)
    # cached latents keep their buckets: a batch of two never stacks a landscape with a portrait
    _train(_config(tiny_model_dir, str(data), tmp_path / 'c', cache_latents=True, center_crop=True, random_flip=True,
                   **settings))


def test_a_dataloader_worker_forked_before_it_ignores_signals_leaves_the_stop_to_the_trainer(monkeypatch):
    """A worker forked inside the loop inherits the handler until its worker_init_fn runs: a Ctrl-C in that
    window must not count as a stop request of its own (it logged a second 'stopping' line)."""
    from finetune.interrupt import StopRequests
    with StopRequests() as stop:
        trainer = os.getpid()
        monkeypatch.setattr(os, 'getpid', lambda: trainer + 1)  # as seen from the forked worker
        stop._handle(signal.SIGINT, None)
        assert stop.signum is None
        monkeypatch.undo()
        stop._handle(signal.SIGINT, None)
        assert stop.signum == signal.SIGINT


def test_a_second_ctrl_c_quits_without_saving(tiny_model_dir, csv_dataset, tmp_path, monkeypatch):
    import finetune.interrupt
    monkeypatch.setattr(finetune.interrupt, 'SAME_REQUEST_S', -1.0)  # no waiting a second between the two
    signal_at_loss_calls(monkeypatch, signal.SIGINT, [5, 6])
    with pytest.raises(KeyboardInterrupt):
        _train(_config(tiny_model_dir, csv_dataset, tmp_path, **RESUME_SETTINGS))
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-2']


def test_a_kill_while_saving_never_leaves_a_complete_looking_checkpoint(tiny_model_dir, csv_dataset, tmp_path,
                                                                        monkeypatch):
    from accelerate import Accelerator

    from finetune.checkpoint import list_checkpoints
    real_save = Accelerator.save_state

    def dies_after_writing_some(self, output_dir=None, **kwargs):
        result = real_save(self, output_dir, **kwargs)
        if output_dir.endswith('checkpoint-4.partial'):
            raise Killed  # files are there, the state file and the rename are not
        return result

    monkeypatch.setattr(Accelerator, 'save_state', dies_after_writing_some)
    with pytest.raises(Killed):
        _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'out', checkpoints_total_limit=1))
    assert sorted(os.listdir(tmp_path / 'out')) == ['checkpoint-2', 'checkpoint-4.partial']
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / 'out'))] == ['checkpoint-2']
    monkeypatch.setattr(Accelerator, 'save_state', real_save)
    # what a kill during the final save leaves: the temporary folder and a file not yet renamed
    os.makedirs(tmp_path / 'out' / '.partial-x1y2')
    (tmp_path / 'out' / '.partial-x1y2' / 'diffusion_pytorch_model.safetensors').write_bytes(b'half')
    (tmp_path / 'out' / 'pytorch_lora_weights.safetensors.partial').write_bytes(b'half')
    _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'out', checkpoints_total_limit=1,
                   resume_from_checkpoint='latest'))
    assert sorted(os.listdir(tmp_path / 'out')) == ['checkpoint-4', 'pytorch_lora_weights.safetensors']


def test_sd2_style_v_prediction_model_trains_on_velocity_and_generates_as_diffusers(csv_dataset, tmp_path,
                                                                                     monkeypatch):
    """SD 2.x differs in what the UNet predicts (v), its attention layout and scheduler: nothing here assumes SD1."""
    import finetune.training as training
    from diffusers import StableDiffusionPipeline

    from modelscope_sd import StableDiffusionText2ImagePipeline
    from tiny_sd import build_tiny_sd
    model = build_tiny_sd(str(tmp_path / 'sd2'), safety_checker=False, sd2=True)
    targets, real_loss = [], training.denoising_loss
    monkeypatch.setattr(training, 'denoising_loss', lambda *a, **kw: targets.append(a[3].config.prediction_type)
                        or real_loss(*a, **kw))
    _train(_config(model, csv_dataset, tmp_path / 'out', max_train_steps=2, learning_rate=5e-2, export_kohya=True))
    assert targets and set(targets) == {'v_prediction'}  # training and validation-loss steps
    from safetensors import safe_open
    with safe_open(str(tmp_path / 'out' / 'pytorch_lora_weights_kohya.safetensors'), framework='pt') as f:
        assert f.metadata()['ss_v2'] == 'True'  # A1111 would otherwise list it as an SD1 adapter
    args = dict(num_inference_steps=3, seed=0)
    base = StableDiffusionText2ImagePipeline(model, device='cpu', progress_bar=False)('a photo', **args)
    vanilla = StableDiffusionPipeline.from_pretrained(model)('a photo', num_inference_steps=3, output_type='np',
                                                             generator=[torch.Generator().manual_seed(0)]).images[0]
    assert np.abs(base['output_imgs'][0].astype(int) - (vanilla * 255).round().astype(int)[..., ::-1]).max() <= 1
    tuned = StableDiffusionText2ImagePipeline(model, device='cpu', progress_bar=False, lora_dir=str(tmp_path / 'out'))
    assert np.abs(tuned('a photo', **args)['output_imgs'][0].astype(int) - base['output_imgs'][0].astype(int)).max() > 0


def test_an_adapter_loads_where_peft_is_older_than_the_one_that_wrote_it(tiny_model_dir, tmp_path, monkeypatch):
    """diffusers hands every field of the file's adapter config to LoraConfig: peft 0.21 (the GPU image's) failed on
    the astra_config that peft 0.22 writes, 'LoraConfig class could not be instantiated'."""
    import json

    import peft
    from safetensors import safe_open

    from modelscope_sd import StableDiffusionText2ImagePipeline
    from train_helpers import make_random_lora
    path = make_random_lora(tiny_model_dir, str(tmp_path / 'lora'), text_encoder=True)
    with safe_open(path, 'pt') as f:
        fields = {key.split('.', 1)[1] for key in json.loads(f.metadata()['lora_adapter_metadata'])}
    assert fields == {'r', 'lora_alpha', 'target_modules', 'init_lora_weights'}  # the rest are peft's defaults

    class Peft021LoraConfig(peft.LoraConfig):
        def __init__(self, **kwargs):
            if 'astra_config' in kwargs:  # the field peft 0.22 added
                raise TypeError("LoraConfig.__init__() got an unexpected keyword argument 'astra_config'")
            super().__init__(**kwargs)

    monkeypatch.setattr(peft, 'LoraConfig', Peft021LoraConfig)
    StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', lora_dir=path)


def test_every_checkpoint_holds_the_adapter_file_and_loads_with_lora_dir(tiny_model_dir, csv_dataset, tmp_path):
    """To compare steps, as diffusers' example allows: each checkpoint-N has pytorch_lora_weights.safetensors."""
    from modelscope_sd import StableDiffusionText2ImagePipeline
    final = _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'out', learning_rate=5e-2, train_text_encoder=True))
    assert load_file(str(tmp_path / 'out' / 'checkpoint-4' / 'pytorch_lora_weights.safetensors')).keys() == \
        load_file(final).keys()

    def image(lora_dir):
        pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False, lora_dir=lora_dir)
        return pipe('a photo', num_inference_steps=2, seed=0)['output_imgs'][0].astype(int)
    assert np.array_equal(image(str(tmp_path / 'out' / 'checkpoint-4')), image(str(tmp_path / 'out')))
    assert np.abs(image(str(tmp_path / 'out' / 'checkpoint-2')) - image(str(tmp_path / 'out'))).max() > 0


def test_kohya_output_name_of_a_run_in_the_current_folder_is_the_folders_name(tiny_model_dir, tmp_path, monkeypatch):
    from finetune.models import kohya_metadata
    (tmp_path / 'my_style').mkdir()
    monkeypatch.chdir(tmp_path / 'my_style')
    for output_dir in ('.', './', '../my_style'):
        metadata = {'modelscope_sd.base_model_dir': tiny_model_dir,
                    'modelscope_sd.training': json.dumps({'output_dir': output_dir})}
        assert kohya_metadata(metadata)['ss_output_name'] == 'my_style'


def test_kohya_export_is_written_and_loads(tiny_model_dir, csv_dataset, tmp_path):
    from modelscope_sd import StableDiffusionText2ImagePipeline
    _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'out', export_kohya=True, max_train_steps=2,
                   learning_rate=5e-2, checkpointing_steps=None))
    kohya = tmp_path / 'out' / 'pytorch_lora_weights_kohya.safetensors'
    args = dict(num_inference_steps=2, seed=0)
    a = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', lora_dir=str(kohya), progress_bar=False)
    b = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', lora_dir=str(tmp_path / 'out'),
                                          progress_bar=False)
    assert np.abs(a('x', **args)['output_imgs'][0].astype(int) - b('x', **args)['output_imgs'][0].astype(int)).max() <= 1
    # kohya's metadata, which A1111's LoRA tab shows; its SD-version check reads ss_v2 (SD2) or any metadata (SD1)
    from safetensors import safe_open
    with safe_open(str(kohya), framework='pt') as f:
        metadata = f.metadata()
    assert {k: metadata[k] for k in ('ss_network_module', 'ss_network_dim', 'ss_network_alpha', 'ss_v2',
                                     'ss_base_model_version', 'ss_max_train_steps', 'ss_resolution',
                                     'ss_output_name')} == {
        'ss_network_module': 'networks.lora', 'ss_network_dim': '4', 'ss_network_alpha': '4', 'ss_v2': 'False',
        'ss_base_model_version': 'sd_v1', 'ss_max_train_steps': '2', 'ss_resolution': '(32, 32)',
        'ss_output_name': 'out'}
    # the captions' tags, which A1111's LoRA tab and civitai show as the adapter's training tags
    dataset = os.path.basename(csv_dataset)
    assert json.loads(metadata['ss_tag_frequency']) == {dataset: {f'a train photo {i}': 1 for i in range(4)}}
    assert json.loads(metadata['ss_dataset_dirs']) == {dataset: {'n_repeats': 1, 'img_count': 4}}
    assert metadata['ss_num_train_images'] == '4'
    # an adapter from elsewhere (no base model to look at) gets none: A1111 lists it as of unknown version
    from finetune.models import export_kohya_lora
    from modelscope_sd.files import save_safetensors
    foreign = save_safetensors(load_file(str(tmp_path / 'out' / 'pytorch_lora_weights.safetensors')),
                               str(tmp_path / 'foreign.safetensors'))
    with safe_open(export_kohya_lora(foreign, str(tmp_path / 'foreign_kohya.safetensors')), framework='pt') as f:
        assert not any(k.startswith('ss_') for k in f.metadata() or {})


# ---------------------------------------------------------------- shell launcher and ModelScope's command line
def _bash(args, env, cwd):
    return run_launcher('run_train_lora.sh', args, env, cwd)


def test_shell_launcher_with_environment_overrides(tiny_model_dir, tmp_path, monkeypatch):
    make_images(str(tmp_path / 'images'), count=2)
    log = _bash([], {'MODEL': tiny_model_dir, 'DATASET': str(tmp_path / 'images'), 'OUTPUT_DIR': 'out',
                     'RESOLUTION': '32', 'MAX_TRAIN_STEPS': '2', 'RANK': '2'}, tmp_path)
    with safe_open(str(tmp_path / 'out' / 'pytorch_lora_weights.safetensors'), framework='pt') as f:
        assert f.metadata()['modelscope_sd.rank'] == '2'
    # the log ends with how to load the adapter, and that command works as printed
    command = re.search(r"(modelscope-sd generate --model \S+ --lora \S+) --prompt '\.\.\.'", log).group(1)
    assert f"model={tiny_model_dir!r}, lora_dir='out')" in log
    from modelscope_sd.cli import main
    monkeypatch.chdir(tmp_path)  # the paths in the log are the user's, relative to where they ran the script
    assert main([*command.split()[1:], '--prompt', 'a photo', '--num_inference_steps', '2', '--device', 'cpu'])


def test_two_processes_reach_max_train_steps_and_resume_exactly(tiny_model_dir, tmp_path):
    """The launcher with ACCELERATE_ARGS for two GPUs, run as two CPU processes (gloo): each process gets half
    of every epoch, so 6 images make 3 steps per epoch and 4 steps take 2 epochs; a run resumed from step 2
    ends with the same adapter."""
    import shutil
    make_images(str(tmp_path / 'images'), count=6)
    env = {'MODEL': tiny_model_dir, 'DATASET': str(tmp_path / 'images'), 'RESOLUTION': '32', 'MAX_TRAIN_STEPS': '4',
           'ACCELERATE_ARGS': '--multi_gpu --num_processes 2', 'ACCELERATE_USE_CPU': 'true'}
    log = _bash(['--checkpointing_steps', '2'], {**env, 'OUTPUT_DIR': str(tmp_path / 'full')}, tmp_path)
    assert '6 examples, 2 epochs, 4 optimizer steps of 1 x 1 x 2 images' in log
    assert sorted(os.listdir(tmp_path / 'full' / 'checkpoint-4')).count('random_states_1.pkl') == 1
    os.makedirs(tmp_path / 'resumed')
    shutil.copytree(tmp_path / 'full' / 'checkpoint-2', tmp_path / 'resumed' / 'checkpoint-2')
    _bash(['--resume_from_checkpoint', 'latest'], {**env, 'OUTPUT_DIR': str(tmp_path / 'resumed')}, tmp_path)
    full = load_file(str(tmp_path / 'full' / 'pytorch_lora_weights.safetensors'))
    resumed = load_file(str(tmp_path / 'resumed' / 'pytorch_lora_weights.safetensors'))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def _kill(pid: int, signum: int) -> bool:
    """Whether ``pid`` was still there to be sent ``signum``."""
    try:
        os.kill(pid, signum)
        return True
    except ProcessLookupError:
        return False


def _default_hangup():
    """A shell cannot trap a signal it was started with ignored: under ``nohup`` (as a CI job may run) the script
    would inherit SIGHUP ignored and the closed-terminal case would test nohup's behaviour, not the script's."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _trainers(launcher_pid):
    """Linux: the processes that run the trainer script under a shell launcher (bash, then accelerate's
    launcher, then the trainers), not the data-loading workers they start."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{entry}/stat') as f:
                parent = int(f.read().rsplit(')', 1)[1].split()[1])
            with open(f'/proc/{entry}/cmdline', 'rb') as f:
                command = f.read()
        except OSError:  # gone meanwhile
            continue
        parents[int(entry)] = parent, command
    return sorted(pid for pid, (parent, command) in parents.items()
                  if b'train_lora.py' in command and parents.get(parent, (None,))[0] == launcher_pid)


@pytest.mark.parametrize('processes, stop', [(1, 'ctrl_c'), (1, 'sigterm_to_launcher'), (1, 'terminal_closed'),
                                             (2, 'ctrl_c'), (2, 'sigterm_to_trainer')])
def test_a_stop_signal_saves_a_checkpoint_and_ends_every_process(tiny_model_dir, tmp_path, processes, stop):
    """Ctrl-C in a terminal (SIGINT to the script's process group), SIGTERM to the script alone (``kill PID``,
    ``docker stop``) and a closed terminal (SIGHUP) reach the trainers through the script, which waits for the
    save; accelerate's one-process launcher would die and leave its trainer running, and torch's multi-GPU
    launcher would kill its trainers 30 s after passing the signal on. SIGTERM to one of two trainers only, as a
    scheduler may send it: the other must stop at the same step, or the save's collectives hang. Each way the
    checkpoint is saved, the script exits with 128 + the number of the signal it got, and no process is left."""
    from finetune.checkpoint import list_checkpoints, read_state
    make_images(str(tmp_path / 'images'), count=4)
    env = {**os.environ, 'MODEL': tiny_model_dir, 'DATASET': str(tmp_path / 'images'), 'RESOLUTION': '32',
           'OUTPUT_DIR': str(tmp_path / 'out'), 'MAX_TRAIN_STEPS': '100000', 'TMPDIR': str(tmp_path)}
    if processes > 1:  # as on two GPUs, with two CPU processes (gloo)
        env.update(ACCELERATE_ARGS=f'--multi_gpu --num_processes {processes}', ACCELERATE_USE_CPU='true')
    with open(tmp_path / 'log', 'w') as log:
        launcher = subprocess.Popen(['bash', os.path.join(REPO, 'finetune', 'run_train_lora.sh'),
                                     '--dataloader_num_workers', '1', '--logging_steps', '1'],
                                    cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_default_hangup)
    trainers = []
    try:
        deadline = time.monotonic() + 120
        while 'loss=' not in (tmp_path / 'log').read_text() and launcher.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / 'log').read_text()[-3000:]
            time.sleep(0.2)
        trainers = _trainers(launcher.pid)
        assert len(trainers) == processes
        assert launcher.pid not in map(os.getpgid, trainers)  # only the script gets the group's signals
        if stop == 'ctrl_c':
            os.killpg(launcher.pid, signal.SIGINT)
        elif stop == 'terminal_closed':
            os.killpg(launcher.pid, signal.SIGHUP)
        elif stop == 'sigterm_to_launcher':
            os.kill(launcher.pid, signal.SIGTERM)
        else:
            os.kill(trainers[-1], signal.SIGTERM)
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        alive = [pid for pid in trainers if _kill(pid, signal.SIGKILL)]  # torch's workers: each in its own session
    assert not alive, 'trainers outlived their launcher'
    text = (tmp_path / 'log').read_text()
    received = {'ctrl_c': signal.SIGINT, 'terminal_closed': signal.SIGHUP, 'sigterm_to_launcher': signal.SIGTERM}
    if stop in received:
        assert launcher.returncode == 128 + received[stop], text[-3000:]
    else:  # the launcher did not see the signal: accelerate reports a failure
        assert launcher.returncode == 1, text[-3000:]
    assert 'Stopped at step' in text, text[-3000:]
    assert 'CalledProcessError' not in text  # accelerate adds no traceback of its own
    # one line per signalled trainer; its data worker ignores the signal
    assert text.count('stopping after this step') == (1 if stop == 'sigterm_to_trainer' else processes)
    with pytest.raises(ProcessLookupError):  # no trainer or worker still running in the background
        os.killpg(launcher.pid, 0)
    [checkpoint] = list_checkpoints(str(tmp_path / 'out'))
    assert checkpoint.endswith(f"checkpoint-{read_state(checkpoint)['global_step']}")
    assert sorted(os.listdir(tmp_path / 'out')) == [os.path.basename(checkpoint)]  # no adapter: the run is not done


def test_modelscope_example_command_line_runs_unchanged(tiny_model_dir, csv_dataset, tmp_path):
    work_dir = str(tmp_path / 'tmp' / 'lora_diffusion')
    log = _bash(['--model', tiny_model_dir, '--model_revision', 'v1.0.0', '--prompt', 'a dog',
                    '--work_dir', work_dir, '--train_dataset_name', csv_dataset, '--max_epochs', '1',
                    '--lora_rank', '16', '--save_ckpt_strategy', 'by_epoch', '--logging_interval', '1',
                    '--train.dataloader.workers_per_gpu', '0', '--evaluation.dataloader.workers_per_gpu', '0',
                    '--train.optimizer.lr', '1e-4', '--torch_type', 'float16', '--use_model_config', 'true'],
                   {'RESOLUTION': '32'}, tmp_path)
    assert '--use_model_config true: accepted, no effect here' in log
    assert '--torch_type float16 → --mixed_precision fp16' in log
    assert 'validation loss' in log  # the csv's validation split is used
    assert os.path.isfile(os.path.join(work_dir, 'output', 'pytorch_lora_weights.safetensors'))
    assert os.path.isdir(os.path.join(work_dir, 'output', 'checkpoint-4'))  # by_epoch: 4 images, batch 1
    assert Image.open(tmp_path / 'lora_result.png').size == (32, 32)


# ---------------------------------------------------------------- bad input
def test_resume_with_settings_that_change_the_checkpoint_is_refused_before_loading(tiny_model_dir, csv_dataset,
                                                                                   tmp_path, monkeypatch):
    _train(_config(tiny_model_dir, csv_dataset, tmp_path, max_train_steps=2))
    import finetune.train_lora as train_lora

    def no_loading(*args, **kwargs):
        raise AssertionError('models were loaded before the settings were checked')

    monkeypatch.setattr(train_lora, 'load_components', no_loading)
    with pytest.raises(ValueError, match=r"--optimizer 'adamw' there, 'adafactor' now; --rank 4 there, 8 now"):
        _train(_config(tiny_model_dir, csv_dataset, tmp_path, resume_from_checkpoint='latest', rank=8,
                       optimizer='adafactor'))
    # a resume restores the checkpoint's learning rate: another one would be ignored, so it is refused
    with pytest.raises(ValueError, match=r"--learning_rate 0.001 there, 0.0005 now.*another --output_dir \(from its "
                                         r"adapter: --network_weights .*checkpoint-2\)"):
        _train(_config(tiny_model_dir, csv_dataset, tmp_path, resume_from_checkpoint='latest', learning_rate=5e-4))
    # the same modules in another order, and settings that do not shape the checkpoint, resume
    with pytest.raises(AssertionError, match='models were loaded'):
        _train(_config(tiny_model_dir, csv_dataset, tmp_path, resume_from_checkpoint='latest', train_batch_size=2,
                       target_modules='to_v,to_q,to_k,to_out.0'))


def test_inpainting_base_model_is_refused_by_name(tmp_path):
    from diffusers import StableDiffusionInpaintPipeline

    from finetune.models import load_components
    from tiny_sd import tiny_components
    parts = tiny_components(str(tmp_path / 'tok'), safety_checker=False, in_channels=9)
    StableDiffusionInpaintPipeline(**parts, requires_safety_checker=False).save_pretrained(tmp_path / 'inpaint')
    with pytest.raises(ValueError, match='9-channel UNet.*text-to-image base'):
        load_components(str(tmp_path / 'inpaint'), None)


def test_an_adapter_or_embedding_given_as_the_base_model_is_refused_as_what_it_is(tiny_model_dir, csv_dataset,
                                                                                   tmp_path):
    """A trained LoRA's output folder as --pretrained_model_name_or_path was read as a single-file model, and the
    advice was to convert the adapter into a model."""
    from safetensors.torch import save_file

    from finetune.models import load_components
    out = tmp_path / 'lora'  # with its kohya copy: two adapter files, no model
    _train(_config(tiny_model_dir, csv_dataset, out, max_train_steps=1, checkpointing_steps=None, export_kohya=True))
    for model in (str(out), str(out / 'pytorch_lora_weights.safetensors')):
        with pytest.raises(ValueError, match=f"is a LoRA adapter .*not a base model: pass the model it was trained on "
                                             f"\\({re.escape(tiny_model_dir)}\\)"):
            load_components(model, None) if os.path.isdir(model) else LoraTrainConfig(
                pretrained_model_name_or_path=model, dataset_name='test/x')
    save_file({'emb_params': torch.zeros(2, 32)}, str(tmp_path / 'style.safetensors'))
    with pytest.raises(ValueError, match='is a textual-inversion embedding .*not a base model'):
        LoraTrainConfig(pretrained_model_name_or_path=str(tmp_path / 'style.safetensors'), dataset_name='test/x')


def test_report_to_a_tracker_that_cannot_log_is_refused(monkeypatch):
    import accelerate.tracking
    monkeypatch.setattr(accelerate.tracking, 'get_available_trackers', lambda: [])
    with pytest.raises(ValueError, match="report_to='tensorboard': tensorboard is not installed here. pip install"):
        LoraTrainConfig(dataset_name='test/x', report_to='tensorboard')
    with pytest.raises(ValueError, match="report_to='tensorbaord' is not one of"):
        LoraTrainConfig(dataset_name='test/x', report_to='tensorbaord')


def test_revision_defaults_to_the_model_cards_only_for_its_model():
    assert LoraTrainConfig(dataset_name='test/x').revision == 'v1.0.0'
    assert LoraTrainConfig(dataset_name='test/x', pretrained_model_name_or_path='someone/sd-finetune').revision is None
    config, _ = parse_args(LoraTrainConfig, ['--model', 'someone/sd-finetune', '--model_revision', 'v2'], 'x')
    assert config.revision == 'v2'


def test_output_name_is_the_kohya_files_name_and_training_comment_its_comment(tiny_model_dir, csv_dataset, tmp_path):
    from modelscope_sd import StableDiffusionText2ImagePipeline
    out = tmp_path / 'out'
    _train(_config(tiny_model_dir, csv_dataset, out, output_name='my_style', training_comment='trigger: sks',
                   max_train_steps=2, learning_rate=5e-2, checkpointing_steps=None))
    assert sorted(n for n in os.listdir(out) if n.endswith('.safetensors')) == [
        'my_style.safetensors', 'pytorch_lora_weights.safetensors']  # --output_name implies --export_kohya
    with safe_open(str(out / 'my_style.safetensors'), framework='pt') as f:
        metadata = f.metadata()
    assert (metadata['ss_output_name'], metadata['ss_training_comment']) == ('my_style', 'trigger: sks')
    images = [StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', lora_dir=lora_dir, progress_bar=False)(
        'x', num_inference_steps=2, seed=0)['output_imgs'][0].astype(int) for lora_dir in (str(out),
                                                                                        str(out / 'my_style.safetensors'))]
    assert np.abs(images[0] - images[1]).max() <= 1  # the folder still loads: the diffusers file is preferred


@pytest.mark.parametrize('schedule, expected', [
    (dict(lr_scheduler='cosine_with_restarts', lr_num_cycles=2), 1e-3),  # the second cycle starts at the peak
    (dict(lr_scheduler='polynomial', lr_power=2.0), (1e-3 - 1e-7) * 0.5 ** 2 + 1e-7),  # linear would be half
])
def test_lr_schedules_take_their_cycles_and_power(tiny_model_dir, csv_dataset, tmp_path, schedule, expected):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'out', checkpointing_steps=None, logging_steps=1,
                   report_to='tensorboard', **schedule))
    events = EventAccumulator(str(tmp_path / 'out' / 'logs' / 'modelscope-sd'))
    events.Reload()
    lrs = {e.step: e.value for e in events.Scalars('lr')}
    assert lrs[2] == pytest.approx(expected, rel=1e-5), lrs


def test_kohya_command_line_flags_map_onto_ours_and_say_how(tmp_path, capsys):
    argv = ['--train_data_dir', str(tmp_path), '--network_module', 'networks.lora', '--network_dim', '16',
            '--network_alpha', '8', '--optimizer_type', 'AdamW8bit', '--learning_rate', '1e-4', '--unet_lr', '5e-4',
            '--max_train_epochs', '10', '--save_every_n_epochs', '2', '--min_snr_gamma', '5',
            '--caption_dropout_rate', '0.05', '--caption_extension', '.txt', '--xformers', '--save_model_as',
            'safetensors', '--keep_tokens', '1', '--shuffle_caption', '--clip_skip', '2', '--resolution', '768,768']
    config, notes = parse_args(LoraTrainConfig, argv, 'x')
    assert (config.rank, config.lora_alpha, config.optimizer, config.use_8bit_adam, config.learning_rate) == (
        16, 8, 'adamw', True, 5e-4)
    assert (config.num_train_epochs, config.max_train_steps, config.checkpointing_epochs, config.snr_gamma,
            config.proportion_empty_prompts, config.keep_tokens, config.clip_skip, config.resolution) == (
        10, None, 2, 5.0, 0.05, 1, 2, 768)
    assert '--network_dim 16 → --rank 16' in notes and '--unet_lr 5e-4 → --learning_rate 0.0005' in notes
    assert '--caption_extension .txt → as here' in notes
    assert any(note.startswith("--xformers true: accepted, no effect here (PyTorch's scaled-dot-product") for note in
               notes)
    for flag, value, words in (('--network_module', 'lycoris.kohya', 'this trainer trains LoRA (networks.lora)'),
                               ('--optimizer_type', 'Prodigy', 'the optimizers here are AdamW, AdamW8bit and'),
                               ('--network_alpha', '0.5', 'LoRA alpha is a whole number here'),
                               ('--caption_extension', '.tags', 'captions are read from .txt files'),
                               ('--resolution', '512,768', "'512,768': training is square here; --enable_bucket"),
                               ('--resolution', 'big', "'big': a size in pixels"),
                               ('--caption_dropout_rate', '1', 'error: --caption_dropout_rate 1: '
                                                               'proportion_empty_prompts=1.0 must be in [0, 1)'),
                               ('--max_epochs', '0', 'error: --max_epochs 0: num_train_epochs=0 must be >= 1.')):
        with pytest.raises(SystemExit):
            parse_args(LoraTrainConfig, ['--train_data_dir', str(tmp_path), flag, value], 'x')
        assert words in capsys.readouterr().err


def test_more_kohya_flags_map_onto_ours_and_the_rest_are_refused_together_with_what_to_do(tmp_path, capsys):
    argv = ['--train_data_dir', str(tmp_path), '--enable_bucket', '--min_bucket_reso', '320', '--max_bucket_reso',
            '768', '--bucket_reso_steps', '64', '--lr_scheduler', 'cosine_with_restarts', '--lr_scheduler_num_cycles',
            '3', '--lr_scheduler_power', '1', '--v_parameterization', '--flip_aug', '--center_crop',
            '--cache_latents_to_disk', '--save_last_n_epochs', '2', '--output_name', 'my_style', '--training_comment',
            'trigger: sks', '--save_state', '--mem_eff_attn', '--full_bf16', '--logging_dir', 'logs', '--loss_type',
            'l2']
    config, notes = parse_args(LoraTrainConfig, argv, 'x')
    assert (config.min_bucket_reso, config.max_bucket_reso, config.lr_num_cycles, config.lr_power) == (320, 768, 3, 1.0)
    assert (config.prediction_type, config.random_flip, config.cache_latents, config.checkpoints_total_limit) == (
        'v_prediction', True, True, 2)
    assert (config.output_name, config.export_kohya, config.training_comment) == ('my_style', True, 'trigger: sks')
    assert '--lr_scheduler_num_cycles 3 → --lr_num_cycles 3' in notes and '--flip_aug true → --random_flip True' in notes
    assert any(note.startswith('--save_state true: accepted, no effect here (every checkpoint holds the optimizer')
               for note in notes)
    config, _ = parse_args(LoraTrainConfig, ['--train_data_dir', str(tmp_path), '--lr_scheduler', 'polynomial',
                                             '--lr_scheduler_power', '2'], 'x')
    assert config.lr_power == 2.0
    config, _ = parse_args(LoraTrainConfig, ['--train_data_dir', str(tmp_path), '--dynamo_backend', 'INDUCTOR',
                                             '--dynamo_mode', 'reduce-overhead'], 'x')
    assert (config.torch_compile, config.torch_compile_mode) == (True, 'reduce-overhead')
    with pytest.raises(SystemExit):
        parse_args(LoraTrainConfig, ['--train_data_dir', str(tmp_path), '--reg_data_dir', 'reg', '--color_aug',
                                     '--network_args', 'conv_dim=4', 'conv_alpha=1', '--network_dim', '8'], 'x')
    err = capsys.readouterr().err
    assert ('kohya flags that this trainer does not follow: --reg_data_dir: regularization (class) images train with '
            'the DreamBooth trainer') in err
    assert '; --color_aug: no color augmentation here' in err and '; --network_args: LoCon (conv_dim)' in err
    for flag, value, words in (('--bucket_reso_steps', '32', "bucket sides are multiples of 64"),
                               ('--loss_type', 'huber', 'the loss is the mean squared error'),
                               ('--dynamo_backend', 'aot_eager', 'the UNet compiles with inductor here')):
        with pytest.raises(SystemExit):
            parse_args(LoraTrainConfig, ['--train_data_dir', str(tmp_path), flag, value], 'x')
        assert words in capsys.readouterr().err


def test_typo_flag_fails_instead_of_vanishing(capsys):
    with pytest.raises(SystemExit):
        parse_args(LoraTrainConfig, ['--learning_rat', '1e-4'], 'x')
    assert 'unrecognized arguments: --learning_rat' in capsys.readouterr().err


def test_a_bad_flag_is_two_lines_and_help_keeps_the_docstrings_command_lines(capsys):
    """Not the error under a usage of the ~100 flags; --help lists them, and keeps the example commands as written."""
    for argv in (['--learning_rat', '1e-4'], ['--max_train_steps', '0']):
        with pytest.raises(SystemExit):
            parse_args(LoraTrainConfig, argv, 'x', prog='train_lora.py')
        assert capsys.readouterr().err.splitlines()[0] == 'usage: train_lora.py [--FLAG VALUE ...]  (--help lists every flag)'
    with pytest.raises(SystemExit):
        parse_args(LoraTrainConfig, ['--max_train_steps', '0'], 'x', prog='train_lora.py')
    assert capsys.readouterr().err.splitlines()[1:] == ['train_lora.py: error: max_train_steps=0 must be >= 1.']
    from finetune import train_lora
    with pytest.raises(SystemExit):
        parse_args(LoraTrainConfig, ['--help'], train_lora.__doc__, prog='train_lora.py')
    help_text = capsys.readouterr().out
    assert '    accelerate launch finetune/train_lora.py --dataset_name ' in help_text
    assert '--max_train_steps MAX_TRAIN_STEPS' in help_text and 'default: 512' in help_text


@pytest.mark.parametrize('kwargs, message', [
    (dict(resolution=30), 'resolution=30 must be a multiple of 8'),
    (dict(rank=0), 'rank=0 must be >= 1'),
    (dict(dataset_name=None), 'No training data'),
    (dict(mixed_precision='fp8'), "mixed_precision='fp8'"),
    (dict(learning_rate=float('nan')), 'learning_rate=nan must be a finite number'),
    (dict(snr_gamma=float('inf')), 'snr_gamma=inf must be a finite number'),
    (dict(max_grad_norm=0.0), 'max_grad_norm=0.0 must be > 0'),
    (dict(adam_beta2=1.0), 'adam_beta2=1.0 must be in [0, 1)'),
    (dict(adam_epsilon=-1e-8), 'adam_epsilon=-1e-08 must be > 0'),
    (dict(lr_warmup_steps=-1), 'lr_warmup_steps=-1 must be >= 0'),
    (dict(max_token_length=100), 'max_token_length=100 must be a multiple of 75'),
    (dict(proportion_empty_prompts=1.0), 'proportion_empty_prompts=1.0 must be in [0, 1)'),
    (dict(validation_prompt='a cat <lora:x:1>'), 'validation_prompt: <lora:x:1>: A1111 network tags go in the text'),
    (dict(clip_skip=0), "clip_skip=0 must be >= 1 (A1111's count"),
    (dict(lr_num_cycles=0), 'lr_num_cycles=0 must be >= 1'),
    (dict(lr_power=0.0), 'lr_power=0.0 must be > 0'),
    (dict(lr_num_cycles=3), "lr_num_cycles=3 shapes the cosine_with_restarts schedule, and lr_scheduler is 'constant'"),
    (dict(lr_scheduler='cosine', lr_power=2.0), "lr_power=2.0 shapes the polynomial schedule, and lr_scheduler is"),
    (dict(min_bucket_reso=256), 'min_bucket_reso=256 sets the aspect-ratio buckets: pass --enable_bucket'),
    (dict(enable_bucket=True, max_bucket_reso=100), 'max_bucket_reso=100 must be a positive multiple of 8'),
    (dict(enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256, resolution=512),
     'resolution=512 must lie between min_bucket_reso=64 and max_bucket_reso=256'),
    (dict(output_name='out/my_style'), "output_name='out/my_style' must be a file name without a folder"),
    (dict(output_name='my_style.safetensors'), "give the name without its extension"),
    (dict(output_name='pytorch_lora_weights'), 'is a name the trainers write themselves'),
    (dict(output_name='x', use_dora=True), 'use_dora with export_kohya (output_name names that file)'),
    (dict(text_encoder_lr=5e-5), 'the text encoder trains only with --train_text_encoder: pass it too'),
    (dict(text_encoder_lr=0.0, train_text_encoder=True), 'text_encoder_lr=0.0 must be > 0'),
    (dict(adam_epsilon=0.0), "adam_epsilon=0.0 must be > 0 (1e-8 is usual): with 0, a weight whose gradient is "),
    (dict(seed=-1), "seed=-1 must be >= 0: the seed decides the data order"),
    (dict(torch_compile=True, torch_compile_mode='max'), "torch_compile_mode='max' is not one of reduce-overhead, "),
    (dict(torch_compile_mode='reduce-overhead'), 'is how --torch_compile compiles: pass --torch_compile too'),
    (dict(torch_compile=True, torch_compile_mode='max-autotune', gradient_accumulation_steps=2),
     'writes its gradients over the last one, so they cannot add up over --gradient_accumulation_steps 2: pass 1'),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LoraTrainConfig(**{'dataset_name': 'test/x', **kwargs})


def test_an_output_dir_inside_the_image_folder_is_refused(tmp_path):
    """Its validation images would be read as training images (subfolders are read) on a resume."""
    make_images(str(tmp_path / 'photos'))
    for output_dir, where in ((tmp_path / 'photos' / 'out', 'is inside'), (tmp_path / 'photos', 'is')):
        with pytest.raises(ValueError, match=re.escape(f"output_dir='{output_dir}' {where} train_data_dir=")
                           + '.*Pass a --output_dir outside'):
            LoraTrainConfig(train_data_dir=str(tmp_path / 'photos'), output_dir=str(output_dir))
    LoraTrainConfig(train_data_dir=str(tmp_path / 'photos'), output_dir=str(tmp_path / 'photos-out'))


def test_target_modules_that_pick_no_layer_are_named_with_the_ones_there_are(tiny_model_dir):
    """Before: peft's NoMatchingPeftModuleError traceback for a typo, or one with a ModuleList's repr for to_out."""
    from diffusers import UNet2DConditionModel

    from finetune.models import add_lora
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder='unet')
    with pytest.raises(ValueError) as error:
        add_lora(unet, 4, 4, 0.0, ['to_q', 'to_qq', 'to_out'])
    assert str(error.value).startswith('--target_modules to_q,to_qq,to_out: to_qq names no layer of the '
                                       'UNet2DConditionModel; to_out is a ModuleList, not a Linear or Conv2d layer. '
                                       'Layers that take adapters here: conv, conv1,')
    assert ' proj_in, proj_out, time_emb_proj, to_k, to_out.0, to_q, to_v.' in str(error.value)
    assert not any('lora' in name for name, _ in unet.named_modules())  # refused before any adapter went in
    add_lora(unet, 4, 4, 0.0, ['to_q', 'attn2.to_k', 'ff.net.0.proj', 'conv1'])


def test_a_quoted_home_folder_is_the_home_folder_not_a_folder_named_tilde(tmp_path, monkeypatch):
    """OUTPUT_DIR="~/my-lora" bash finetune/run_train_lora.sh passes '~/my-lora' as it is: the run wrote into
    ./~/my-lora."""
    monkeypatch.setenv('HOME', str(tmp_path))
    make_images(str(tmp_path / 'photos'))
    config = LoraTrainConfig(train_data_dir='~/photos', output_dir='~/my-lora', dataset_name=None)
    assert (config.train_data_dir, config.output_dir) == (str(tmp_path / 'photos'), str(tmp_path / 'my-lora'))
    from finetune.config import PATH_FLAGS, DreamBoothConfig
    fields = {f.name for config_class in (LoraTrainConfig, DreamBoothConfig)
              for f in dataclasses.fields(config_class)}
    assert set(PATH_FLAGS) <= fields  # a renamed flag would leave its '~' unexpanded


def test_a_hub_pages_address_names_the_id_to_pass():
    for kwargs, message in (
            (dict(dataset_name='https://modelscope.cn/datasets/buptwq/lora-stable-diffusion-finetune/summary'),
             "dataset_name='https://modelscope.cn/datasets/buptwq/lora-stable-diffusion-finetune/summary': no such "
             "folder, and not a ModelScope dataset id (owner/name) (the hub id in it is "
             "'buptwq/lora-stable-diffusion-finetune': pass that)."),
            (dict(dataset_name='test/x', pretrained_model_name_or_path='https://www.modelscope.cn/models/o/m'),
             "(the hub id in it is 'o/m': pass that)")):
        with pytest.raises(FileNotFoundError, match=re.escape(message)):
            LoraTrainConfig(**kwargs)


def test_missing_folders_are_refused_with_the_options_before_training(tiny_model_dir, tmp_path):
    missing = str(tmp_path / 'no' / 'such' / 'data')
    for kwargs, message in ((dict(dataset_name=missing), f'dataset_name={missing!r}: no such folder, and not a '
                                                         'ModelScope dataset id'),
                            (dict(train_data_dir=missing), f'train_data_dir={missing!r}: no such folder'),
                            (dict(pretrained_model_name_or_path=missing),
                             f'pretrained_model_name_or_path={missing!r}: no such folder, and not a ModelScope model')):
        with pytest.raises(FileNotFoundError, match=re.escape(message)):
            _config(tiny_model_dir, 'test/photos', tmp_path / 'out', **kwargs)
    with pytest.raises(ValueError, match=re.escape(f"dataset_name={__file__!r} is a file: pass a folder")):
        _config(tiny_model_dir, __file__, tmp_path / 'out')


def test_empty_dataset_folder(tiny_model_dir, tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='holds no images'):
        _train(_config(tiny_model_dir, str(tmp_path / 'empty'), tmp_path / 'out'))


def test_missing_captions_are_listed(tiny_model_dir, tmp_path):
    make_images(str(tmp_path / 'imgs'), count=3)
    os.remove(tmp_path / 'imgs' / 'img1.txt')
    with pytest.raises(ValueError, match=r"1 image\(s\) .* have no caption: \['img1.png'\]"):
        _train(_config(tiny_model_dir, str(tmp_path / 'imgs'), tmp_path / 'out'))


def test_corrupt_images_fail_listed_or_are_skipped_and_counted(tiny_model_dir, tmp_path, caplog):
    make_images(str(tmp_path / 'imgs'), count=3)
    (tmp_path / 'imgs' / 'img2.png').write_bytes(b'not a png')
    with pytest.raises(ValueError, match=r'1 unreadable image\(s\).*img2.png.*--skip_bad_images'):
        _train(_config(tiny_model_dir, str(tmp_path / 'imgs'), tmp_path / 'out'))
    _train(_config(tiny_model_dir, str(tmp_path / 'imgs'), tmp_path / 'out2', skip_bad_images=True,
                   max_train_steps=1, checkpointing_steps=None))
    assert 'Skipping 1 unreadable image(s)' in caplog.text


def test_images_the_vae_encodes_to_nan_are_named_before_the_first_step(tiny_model_dir, tmp_path):
    """An fp16 VAE that overflows, or a broken --vae: every step that draws such an image would be NaN."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder='vae')
    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] = float('nan')
    vae.save_pretrained(tmp_path / 'broken-vae')
    make_images(str(tmp_path / 'imgs'), count=2)
    with pytest.raises(ValueError, match=r"The VAE encoded 2 image\(s\) to NaN or inf in float32: .*img0.png, "
                                         r".*img1.png\. The VAE \(its --vae, or the model's\) may hold NaN"):
        _train(_config(tiny_model_dir, str(tmp_path / 'imgs'), tmp_path / 'out', cache_latents=True,
                       vae=str(tmp_path / 'broken-vae')))
    assert not any(name.startswith('checkpoint-') for name in os.listdir(tmp_path / 'out'))


def test_an_output_dir_that_cannot_be_made_is_refused_before_loading(tiny_model_dir, csv_dataset, tmp_path):
    (tmp_path / 'notes.txt').write_text('not a folder')
    out = str(tmp_path / 'notes.txt' / 'run')
    with pytest.raises(ValueError, match=re.escape(f'output_dir={out!r} cannot be created (Not a directory): pass a '
                                                   'folder you can write to.')):
        _train(_config(tiny_model_dir, csv_dataset, out))


def test_output_dir_holding_a_run_is_refused(tiny_model_dir, csv_dataset, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'pytorch_lora_weights.safetensors').write_bytes(b'')
    with pytest.raises(ValueError, match='already holds a run.*--overwrite_output_dir'):
        _train(_config(tiny_model_dir, csv_dataset, out))
    with pytest.raises(ValueError, match="output_dir=.*is a file: pass a folder"):
        _train(_config(tiny_model_dir, csv_dataset, out / 'pytorch_lora_weights.safetensors'))
    # 'latest' with nothing to resume must not start a new run over the finished one either
    with pytest.raises(ValueError, match="holds a run.*but no complete checkpoint.*--overwrite_output_dir"):
        _train(_config(tiny_model_dir, csv_dataset, out, resume_from_checkpoint='latest'))
    assert os.listdir(out) == ['pytorch_lora_weights.safetensors']


def test_a_resume_in_batches_of_another_size_says_it_is_not_exact(tiny_model_dir, csv_dataset, tmp_path, caplog):
    """It went on silently, reading some of the epoch's images again or skipping them."""
    import shutil
    _train(_config(tiny_model_dir, csv_dataset, tmp_path))  # 4 steps, checkpoints at 2 and 4
    shutil.rmtree(tmp_path / 'checkpoint-4')
    _train(_config(tiny_model_dir, csv_dataset, tmp_path, resume_from_checkpoint='latest'))
    assert 'images per step' not in caplog.text  # the same sizes: exact, nothing to say
    shutil.rmtree(tmp_path / 'checkpoint-4')
    _train(_config(tiny_model_dir, csv_dataset, tmp_path, resume_from_checkpoint='latest', train_batch_size=2))
    assert (f'{tmp_path}/checkpoint-2 was saved by a run of 1 x 1 x 1 images per step (train_batch_size x '
            'gradient_accumulation_steps x processes); this run takes 2 x 1 x 1. It goes on from step 2') in caplog.text


def test_resuming_a_checkpoint_past_max_train_steps_is_refused_with_the_earlier_ones(tiny_model_dir, csv_dataset,
                                                                                       tmp_path):
    """It was saved as the result at the checkpoint's own step, the smaller --max_train_steps silently dropped."""
    _train(_config(tiny_model_dir, csv_dataset, tmp_path))  # 4 steps, checkpoints at 2 and 4
    saved = (tmp_path / 'pytorch_lora_weights.safetensors').read_bytes()
    with pytest.raises(ValueError, match=re.escape(
            f"checkpoint-4 is at step 4, past --max_train_steps 3, so the run has nothing left to do. To go on "
            f"training, pass a --max_train_steps above 4. The weights of an earlier step are in {tmp_path}/"
            f"checkpoint-2 (lora_dir='{tmp_path}/checkpoint-2').")):
        _train(_config(tiny_model_dir, csv_dataset, tmp_path, max_train_steps=3, resume_from_checkpoint='latest'))
    assert (tmp_path / 'pytorch_lora_weights.safetensors').read_bytes() == saved
    # a count of epochs is known once the dataset is: 1 epoch of the 4 images is 4 steps, and checkpoint-6 is past it
    _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'b', max_train_steps=6))
    with pytest.raises(ValueError, match=re.escape('checkpoint-6 is at step 6, past --num_train_epochs 1 (4 steps), so')):
        _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'b', max_train_steps=None, num_train_epochs=1,
                       resume_from_checkpoint='latest'))


def test_a_second_run_into_the_folder_of_a_running_one_is_refused_and_touches_nothing(tiny_model_dir, csv_dataset,
                                                                                       tmp_path):
    """A job submitted twice: the second removed the first's half-written checkpoint and rotated its checkpoints."""
    import fcntl

    from finetune.run_lock import LOCK_NAME
    _train(_config(tiny_model_dir, csv_dataset, tmp_path, max_train_steps=2))
    assert not (tmp_path / LOCK_NAME).exists()  # a finished run leaves no lock file
    (tmp_path / 'checkpoint-4.partial').mkdir()  # the running run's save in progress
    with open(tmp_path / LOCK_NAME, 'w') as running:  # another process's open file: a lock of its own
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
        running.write('process 4242 on node7, started 2026-12-07 09:00:00')
        running.flush()
        with pytest.raises(ValueError, match=re.escape(
                f"output_dir={str(tmp_path)!r} is in use by another training (process 4242 on node7, started "
                '2026-12-07 09:00:00): wait for it to end or stop it')):
            _train(_config(tiny_model_dir, csv_dataset, tmp_path, resume_from_checkpoint='latest'))
        assert (tmp_path / 'checkpoint-4.partial').is_dir()
    _train(_config(tiny_model_dir, csv_dataset, tmp_path, resume_from_checkpoint='latest'))  # it has ended
    assert (tmp_path / 'checkpoint-4').is_dir() and not (tmp_path / 'checkpoint-4.partial').exists()


def test_latest_with_no_checkpoint_starts_a_new_run_and_says_so_once(tiny_model_dir, csv_dataset, tmp_path, caplog):
    with caplog.at_level('WARNING', logger='finetune'):
        _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'new', resume_from_checkpoint='latest',
                       max_train_steps=1, checkpointing_steps=None))
    assert [r.getMessage() for r in caplog.records].count(
        f"resume_from_checkpoint='latest' but {tmp_path / 'new'} holds no checkpoint: starting a new run.") == 1
    assert os.path.isfile(tmp_path / 'new' / 'pytorch_lora_weights.safetensors')


@pytest.mark.parametrize('extra', [{}, {'random_flip': True}, {'proportion_empty_prompts': 0.5}])
def test_cached_latents_train_the_same_adapter(tiny_model_dir, csv_dataset, tmp_path, extra):
    """Encoding once gives the same training as encoding every step (same seeds, same samples); with flips,
    each step takes the orientation the uncached run draws; with caption dropout, the same steps get the empty
    prompt."""
    settings = dict(center_crop=True, max_train_steps=6 if extra else 3, checkpointing_steps=None, **extra)
    plain = load_file(_train(_config(tiny_model_dir, csv_dataset, tmp_path / 'plain', **settings)))
    cached = load_file(_train(_config(tiny_model_dir, csv_dataset, tmp_path / 'cached', cache_latents=True,
                                      **settings)))
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-4, atol=1e-5)
    if 'proportion_empty_prompts' in extra:  # and the dropout did change the training
        kept = load_file(_train(_config(tiny_model_dir, csv_dataset, tmp_path / 'kept', center_crop=True,
                                        max_train_steps=6, checkpointing_steps=None)))
        assert any(not torch.allclose(kept[key], plain[key]) for key in plain)


@pytest.mark.parametrize('tags', [{'shuffle_caption': True}, {'caption_tag_dropout_rate': 0.5}])
def test_shuffled_or_thinned_tag_captions_train_the_same_cached_or_not(tiny_model_dir, tmp_path, tags):
    """--shuffle_caption, --caption_tag_dropout_rate: cached latents with prompts encoded per step give the
    uncached run's adapter, and the tags' changes did change what was trained."""
    make_images(str(tmp_path / 'tags'), count=2)
    for i in range(2):
        (tmp_path / 'tags' / f'img{i}.txt').write_text(f'sks, thing {i}, red, green, blue, round, small')
    settings = dict(center_crop=True, max_train_steps=6, checkpointing_steps=None)
    shuffled = dict(settings, keep_tokens=1, **tags)
    plain = load_file(_train(_config(tiny_model_dir, str(tmp_path / 'tags'), tmp_path / 'plain', **shuffled)))
    cached = load_file(_train(_config(tiny_model_dir, str(tmp_path / 'tags'), tmp_path / 'cached',
                                      cache_latents=True, **shuffled)))
    in_order = load_file(_train(_config(tiny_model_dir, str(tmp_path / 'tags'), tmp_path / 'order', **settings)))
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(in_order[key], plain[key]) for key in plain)


def test_long_captions_train_in_windows_cached_or_not(tiny_model_dir, tmp_path, monkeypatch):
    """--max_token_length 150: a 108-token caption reaches the UNet as two 77-token windows, a short one as one
    (as the pipeline reads prompts). In a batch of both, the short one is padded with an empty window, and the
    UNet gets the same prompt states whether prompts are encoded every step or cached once."""
    from diffusers import UNet2DConditionModel
    make_images(str(tmp_path / 'long'), count=2)
    (tmp_path / 'long' / 'img0.txt').write_text('a photo of thing number 0, ' * 4)  # 108 byte tokens
    real_forward, seen = UNet2DConditionModel.forward, []

    def spy(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        seen.append(encoder_hidden_states.detach().clone())
        return real_forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, 'forward', spy)
    settings = dict(center_crop=True, max_train_steps=2, checkpointing_steps=None, max_token_length=150)
    _train(_config(tiny_model_dir, str(tmp_path / 'long'), tmp_path / 'one', **settings))
    assert sorted(states.shape[1] for states in seen) == [77, 154]
    batched = {}
    for name, extra in (('plain', {}), ('cached', {'cache_latents': True})):
        seen.clear()
        _train(_config(tiny_model_dir, str(tmp_path / 'long'), tmp_path / name, **{**settings, 'max_train_steps': 1,
                                                                                   'train_batch_size': 2, **extra}))
        batched[name] = seen[0]
    assert batched['plain'].shape == (2, 154, 32)
    torch.testing.assert_close(batched['cached'], batched['plain'], rtol=1e-5, atol=1e-5)


def test_validation_image_is_what_the_pipeline_makes_of_a_long_edited_prompt(tiny_model_dir, csv_dataset, tmp_path):
    """... and it goes to tensorboard with the loss, as the PNG written beside the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from modelscope_sd import StableDiffusionText2ImagePipeline
    prompt = 'a photo of a [red:blue:0.5] house by a lake, (golden hour:1.2), ' * 2  # past 75 tokens, emphasis, edit
    _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'out', learning_rate=5e-2, validation_prompt=prompt,
                   validation_steps=4, checkpointing_steps=None, report_to='tensorboard', logging_steps=2))
    validation = np.asarray(Image.open(tmp_path / 'out' / 'validation' / 'step-000004-0.png')).astype(int)
    pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False,
                                             load_safety_checker=False, lora_dir=str(tmp_path / 'out'))
    ours = pipe(prompt, num_inference_steps=25, seed=3)['output_imgs'][0][..., ::-1].astype(int)  # seed: _config's
    assert np.abs(validation - ours).max() <= 1  # 0 here; the prompt cut at 77 tokens differed by 4
    events = EventAccumulator(str(tmp_path / 'out' / 'logs' / 'modelscope-sd'), size_guidance={'images': 0})
    events.Reload()
    [logged] = events.Images('validation')
    assert logged.step == 4
    shown = np.asarray(Image.open(io.BytesIO(logged.encoded_image_string)).convert('RGB')).astype(int)
    assert np.array_equal(shown, validation)
    assert [e.step for e in events.Scalars('loss')] == [2, 4]


def test_clip_skip_trains_on_the_layer_it_names_and_says_how_to_generate(tiny_model_dir, csv_dataset, tmp_path,
                                                                         caplog):
    """--clip_skip 2: cached prompts and prompts encoded every step train the same adapter, another than the last
    layer's; validation images, the kohya file's metadata and the log's load line all use Clip skip 2."""
    from safetensors import safe_open

    from modelscope_sd import StableDiffusionText2ImagePipeline
    settings = dict(center_crop=True, max_train_steps=3, checkpointing_steps=None, clip_skip=2)
    with caplog.at_level('INFO', logger='finetune'):
        skipped = load_file(_train(_config(tiny_model_dir, csv_dataset, tmp_path / 'plain', export_kohya=True,
                                           validation_prompt='a red house', validation_steps=3, **settings)))
    cached = load_file(_train(_config(tiny_model_dir, csv_dataset, tmp_path / 'cached', cache_latents=True,
                                      **settings)))
    last = load_file(_train(_config(tiny_model_dir, csv_dataset, tmp_path / 'last', **dict(settings, clip_skip=1))))
    for key in skipped:
        torch.testing.assert_close(cached[key], skipped[key], rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(last[key], skipped[key]) for key in skipped)
    pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False,
                                             load_safety_checker=False, lora_dir=str(tmp_path / 'plain'))
    validation = np.asarray(Image.open(tmp_path / 'plain' / 'validation' / 'step-000003-0.png')).astype(int)
    ours = pipe('a red house', num_inference_steps=25, seed=3, clip_skip=1)['output_imgs'][0][..., ::-1]
    assert np.abs(validation - ours.astype(int)).max() <= 1
    with safe_open(str(tmp_path / 'plain' / 'pytorch_lora_weights_kohya.safetensors'), framework='pt') as f:
        assert f.metadata()['ss_clip_skip'] == '2'
    assert "then pipe({'text': ..., 'clip_skip': 1})" in caplog.text and '--clip_skip 1 --prompt' in caplog.text
    with pytest.raises(ValueError, match=r'clip_skip=7: the text encoder of .* has 2 layers, so clip_skip goes up '
                                         r'to 2'):
        _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'deep', clip_skip=7))


def test_text_encoder_lr_trains_the_text_encoder_at_its_own_rate(tiny_model_dir, csv_dataset, tmp_path):
    """--text_encoder_lr equal to --learning_rate is the run without it (Adam is per parameter); a tiny one leaves
    the text encoder's adapter where it started while the UNet's trains. The rate is part of the checkpoint."""
    settings = dict(train_text_encoder=True, max_train_steps=3, checkpointing_steps=3, logging_steps=1,
                    learning_rate=1e-3)
    plain = load_file(_train(_config(tiny_model_dir, csv_dataset, tmp_path / 'plain', **settings)))
    same = load_file(_train(_config(tiny_model_dir, csv_dataset, tmp_path / 'same', text_encoder_lr=1e-3,
                                    **settings)))
    slow = load_file(_train(_config(tiny_model_dir, csv_dataset, tmp_path / 'slow', text_encoder_lr=1e-12,
                                    **settings)))
    for key in plain:
        torch.testing.assert_close(same[key], plain[key])
    text_up = [key for key in plain if key.startswith('text_encoder.') and 'lora_B' in key]
    assert text_up and all(plain[key].abs().max() > 1e-4 and slow[key].abs().max() < 1e-8 for key in text_up)
    assert all(slow[key].abs().max() > 1e-4 for key in plain if key.startswith('unet.') and 'lora_B' in key)
    with pytest.raises(ValueError, match=re.escape("--text_encoder_lr 1e-12 there, 0.0001 now")):
        _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'slow', text_encoder_lr=1e-4,
                       resume_from_checkpoint='latest', **dict(settings, max_train_steps=4)))


def test_validation_image_of_an_and_prompt_is_what_the_pipeline_makes(tiny_model_dir, csv_dataset, tmp_path):
    from modelscope_sd import StableDiffusionText2ImagePipeline
    prompt = '[a red house:a green dragon:0.5] AND a blue car:0.6'
    _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'out', learning_rate=5e-2, validation_prompt=prompt,
                   validation_steps=4, checkpointing_steps=None))
    validation = np.asarray(Image.open(tmp_path / 'out' / 'validation' / 'step-000004-0.png')).astype(int)
    pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False,
                                             load_safety_checker=False, lora_dir=str(tmp_path / 'out'))
    ours = pipe(prompt, num_inference_steps=25, seed=3)['output_imgs'][0][..., ::-1].astype(int)
    plain = pipe('a red house', num_inference_steps=25, seed=3)['output_imgs'][0][..., ::-1].astype(int)
    assert np.abs(validation - ours).max() <= 1 and np.abs(validation - plain).max() > 2


def test_kohya_sample_prompts_render_what_the_pipeline_makes_each_epoch_and_before_the_first_step(
        tiny_model_dir, csv_dataset, tmp_path):
    """Each line's negative prompt, size, seed, CFG, steps and sampler are those of a pipeline call (DPM++ SDE's
    noise from the seed included); --validation_prompt's image i is the pipeline's image i; --sample_at_first
    renders the base model; every render goes to tensorboard under its own tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from modelscope_sd import StableDiffusionText2ImagePipeline
    lines = ['a red house --n blurry, dark --w 48 --h 32 --d 7 --l 5 --s 6 --ss euler_a',
             'a green dragon --s 4 --ss dpm++_sde']
    (tmp_path / 'prompts.txt').write_text('\n'.join(lines))
    _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'out', learning_rate=5e-2, train_batch_size=2,
                   checkpointing_steps=None, validation_prompt='a photo', num_validation_images=2,
                   sample_prompts=str(tmp_path / 'prompts.txt'), validation_epochs=1, sample_at_first=True,
                   report_to='tensorboard'))
    folder = tmp_path / 'out' / 'validation'
    assert sorted(os.listdir(folder)) == [f'step-{step:06d}-{name}.png' for step in (0, 2, 4)
                                          for name in ('0', '1', 'sample00', 'sample01')]  # 2 steps an epoch

    def saved(step, name):
        return np.asarray(Image.open(folder / f'step-{step:06d}-{name}.png')).astype(int)

    calls = {'sample00': dict(prompt='a red house', negative_prompt='blurry, dark', width=48, height=32, seed=7,
                              guidance_scale=5, num_inference_steps=6, scheduler='euler_a'),
             'sample01': dict(prompt='a green dragon', seed=3, num_inference_steps=4, scheduler='dpm++_sde')}
    for step, lora_dir in ((4, str(tmp_path / 'out')), (0, None)):
        pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False,
                                                 load_safety_checker=False, lora_dir=lora_dir)
        for name, call in calls.items():
            ours = pipe(**call)['output_imgs'][0][..., ::-1].astype(int)
            assert ours.shape == saved(step, name).shape and np.abs(saved(step, name) - ours).max() <= 1, name
        both = pipe('a photo', num_inference_steps=25, seed=3, num_images_per_prompt=2)['output_imgs']
        for i, ours in enumerate(both):
            assert np.abs(saved(step, str(i)) - ours[..., ::-1].astype(int)).max() <= 1
    assert np.abs(saved(4, 'sample00') - saved(0, 'sample00')).max() > 2  # the adapter changed it
    events = EventAccumulator(str(tmp_path / 'out' / 'logs' / 'modelscope-sd'), size_guidance={'images': 0})
    events.Reload()
    assert {tag: [e.step for e in events.Images(tag)] for tag in ('validation', 'sample00', 'sample01')} == {
        'validation': [0, 2, 4], 'sample00': [0, 2, 4], 'sample01': [0, 2, 4]}


def test_cache_latents_crops_centered_and_refuses_random_crops():
    assert LoraTrainConfig(dataset_name='test/x').center_crop is False  # diffusers' default: random crops
    assert LoraTrainConfig(dataset_name='test/x', cache_latents=True).center_crop is True  # kohya's --cache_latents
    with pytest.raises(ValueError, match='cache_latents needs center crops, and --center_crop false asks for random'):
        LoraTrainConfig(dataset_name='test/x', cache_latents=True, center_crop=False, random_flip=True)
    config, _ = parse_args(LoraTrainConfig, ['--dataset_name', 'test/x', '--cache_latents'], 'x')
    assert config.center_crop is True
    config, notes = parse_args(LoraTrainConfig, ['--dataset_name', 'test/x', '--random_crop'], 'x')
    assert config.center_crop is False and '--random_crop true → --center_crop False' in notes


def test_validation_under_torch_compile_runs_eager(tiny_model_dir, csv_dataset, tmp_path, monkeypatch):
    """Validation (no-grad loss on the split, CFG images) would compile new graphs for a few images; it runs
    eager. A backend that records each graph it is given stands in for inductor."""
    graphs = []

    def recording_backend(graph, example_inputs):
        graphs.append(torch.is_grad_enabled())
        return graph.forward

    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda self, **kwargs: real_compile(self, backend=recording_backend))
    torch._dynamo.reset()
    _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'out', torch_compile=True, max_train_steps=2,
                   checkpointing_steps=None, validation_prompt='a photo', validation_steps=1))
    assert sorted(os.listdir(tmp_path / 'out' / 'validation')) == ['step-000001-0.png', 'step-000002-0.png']
    assert graphs and all(graphs), graphs  # training compiled; nothing compiled with grad off


def test_torch_compile_compiles_once_not_every_step(tiny_model_dir, csv_dataset, tmp_path, monkeypatch):
    """A recompile per step would cost minutes per step on SD1.5: a run of 8 steps (two epochs, other timesteps,
    noise and learning rates) compiles no more graphs than a run of 1. A backend that counts the graphs it is
    given stands in for inductor."""
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(len(graph.graph.nodes))
        return graph.forward

    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda self, **kwargs: real_compile(self, backend=counting_backend))
    counts = []
    for steps in (1, 8):
        torch._dynamo.reset()
        graphs.clear()
        _train(_config(tiny_model_dir, csv_dataset, tmp_path / f'out{steps}', torch_compile=True, cache_latents=True,
                       center_crop=True, max_train_steps=steps, checkpointing_steps=None, lr_scheduler='cosine'))
        counts.append(len(graphs))
    assert counts[0] >= 1 and counts[1] == counts[0], counts


@pytest.mark.parametrize('mode, compiled_as', [('default', 'default'), ('reduce-overhead', 'default'),
                                               ('max-autotune', 'max-autotune-no-cudagraphs')])
def test_torch_compile_mode_compiles_the_unet_without_cuda_graphs_off_cuda(tiny_model_dir, csv_dataset, tmp_path,
                                                                          monkeypatch, mode, compiled_as):
    """--torch_compile_mode reaches torch.compile; on the CPU a mode's CUDA graphs are left out (no CUDA-graph
    tree to record into) and the rest of the mode stays. Gradient accumulation works in the mode without them."""
    modes = []
    real_compile = torch.nn.Module.compile

    def recording_compile(self, **kwargs):
        modes.append(kwargs.get('mode'))
        real_compile(self, backend='eager')

    monkeypatch.setattr(torch.nn.Module, 'compile', recording_compile)
    torch._dynamo.reset()
    accumulate = 2 if mode == 'default' else 1
    _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'out', torch_compile=True, torch_compile_mode=mode,
                   gradient_accumulation_steps=accumulate, max_train_steps=1, checkpointing_steps=None))
    assert modes == [compiled_as]


@pytest.mark.slow
def test_compiled_unet_trains_the_same_adapter(tiny_model_dir, csv_dataset, tmp_path):
    """--torch_compile (inductor on the CPU, about a minute) changes speed, not the result; resume from its
    checkpoint works because the module and its state-dict keys are unchanged by compiling in place."""
    settings = dict(center_crop=True, cache_latents=True, max_train_steps=3, checkpointing_steps=2)
    eager = load_file(_train(_config(tiny_model_dir, csv_dataset, tmp_path / 'eager', **settings)))
    out = tmp_path / 'compiled'
    compiled = load_file(_train(_config(tiny_model_dir, csv_dataset, out, torch_compile=True, **settings)))
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-3, atol=1e-4)
    resumed = load_file(_train(_config(tiny_model_dir, csv_dataset, out, torch_compile=True, overwrite_output_dir=True,
                                       resume_from_checkpoint='latest', **{**settings, 'max_train_steps': 4})))
    assert set(resumed) == set(eager)


def test_checkpoints_that_would_outgrow_the_disk_are_warned_of_before_training(tiny_model_dir, csv_dataset, tmp_path,
                                                                              monkeypatch, caplog):
    import collections

    import finetune.checkpoint as checkpoint
    usage = collections.namedtuple('usage', 'total used free')
    free = {'bytes': 50_000}
    monkeypatch.setattr(checkpoint.shutil, 'disk_usage', lambda path: usage(0, 0, free['bytes']))
    params = [torch.zeros(1000)]  # fp32 weights + AdamW's two moments: 12,000 bytes a checkpoint
    config = LoraTrainConfig(dataset_name='test/x', output_dir=str(tmp_path), checkpointing_steps=100)
    checkpoint.warn_if_checkpoints_outgrow_the_disk(config, params, 1000, None)  # 10 checkpoints: 120,000 bytes
    assert '--checkpoints_total_limit 3' in caplog.text  # 3 kept + the one being written fit in 50,000
    caplog.clear()
    config = LoraTrainConfig(dataset_name='test/x', output_dir=str(tmp_path), checkpointing_steps=100,
                             checkpoints_total_limit=3)
    checkpoint.warn_if_checkpoints_outgrow_the_disk(config, params, 1000, None)
    assert not caplog.text
    conv = [torch.zeros(8, 8, 3, 3)]  # Adafactor: a row and a column of second moments per 3×3 kernel matrix
    assert checkpoint.checkpoint_bytes(LoraTrainConfig(dataset_name='test/x', optimizer='adafactor'), conv) == 4 * (576 + 384)
    free['bytes'] = 1  # and a training run says so before its first step
    _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'out', max_train_steps=1, checkpointing_steps=1))
    assert 'free space, or pass a --checkpointing_steps past --max_train_steps' in caplog.text


def test_out_of_memory_saves_the_last_finished_step_and_names_the_flags_that_help(tiny_model_dir, csv_dataset, tmp_path,
                                                                                  monkeypatch, uninterrupted, caplog):
    """An OOM mid-run (a larger bucket, a validation render) lost every step since the last checkpoint."""
    def out_of_memory():
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    revive = at_loss_calls(monkeypatch, [8], out_of_memory)  # the second micro-batch of step 4: step 3 is whole
    with pytest.raises(torch.OutOfMemoryError):
        _train(_config(tiny_model_dir, csv_dataset, tmp_path, **RESUME_SETTINGS))
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-2', 'checkpoint-3']
    assert 'Flags that use less: --mixed_precision bf16, --gradient_checkpointing' in caplog.text
    revive()
    resumed = load_file(_train(_config(tiny_model_dir, csv_dataset, tmp_path, resume_from_checkpoint='latest',
                                       **RESUME_SETTINGS)))
    _assert_same_adapter(resumed, uninterrupted)
    # in the weight update of step 4 the step is half done: step 3 is not saved from it
    import finetune.training as training
    monkeypatch.setattr(training, 'make_optimizer', lambda config, params, device, lr: _OutOfMemoryInStep4(params))
    with pytest.raises(torch.OutOfMemoryError):
        _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'b', **RESUME_SETTINGS))
    assert os.listdir(tmp_path / 'b') == ['checkpoint-2']


class _OutOfMemoryInStep4(torch.optim.AdamW):
    def step(self, closure=None):
        self.steps = getattr(self, 'steps', 0) + 1
        if self.steps == 4:
            raise torch.OutOfMemoryError('CUDA out of memory in the optimizer step')
        return super().step(closure)


def test_weights_gone_nan_stop_the_run_and_keep_the_last_good_checkpoint(tiny_model_dir, csv_dataset, tmp_path,
                                                                          monkeypatch, caplog):
    """A NaN step (a learning rate far too high, fp16 overflow) went on to the end: checkpoints of NaN weights
    rotated the good ones away, and the final adapter was NaN, with exit status 0."""
    import finetune.training as training
    real_loss, calls = training.denoising_loss, []

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        losses = real_loss(*args, **kwargs)
        return losses * float('nan') if len(calls) == 3 else losses

    monkeypatch.setattr(training, 'denoising_loss', nan_at_step_3)
    with pytest.raises(SystemExit, match=r'NaN or inf at step 4\. The last checkpoint, .*checkpoint-2, holds finite '
                       r'weights.*--learning_rate 0\.001.*--network_weights .*checkpoint-2') as stopped:
        _train(_config(tiny_model_dir, csv_dataset, tmp_path, max_train_steps=6, checkpoints_total_limit=1))
    assert stopped.value.code != 0
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-2']  # no NaN checkpoint-4, no final adapter
    kept = load_file(tmp_path / 'checkpoint-2' / 'pytorch_lora_weights.safetensors')
    assert all(torch.isfinite(value).all() for value in kept.values())


def test_a_nan_loss_over_finite_weights_is_said_and_training_goes_on(caplog):
    """fp16's loss scaler skips a step whose loss overflowed: the weights stay finite, so the run goes on."""
    from types import SimpleNamespace

    from finetune.divergence import TrainingDiverged, check_finite
    config = SimpleNamespace(output_dir='unused', learning_rate=1e-4, text_encoder_lr=None, scale_lr=False)
    check_finite([torch.ones(3)], config, 7, loss=float('inf'))
    assert 'step 7: the loss is inf, but the trained weights are finite' in caplog.text
    with pytest.raises(TrainingDiverged, match='No checkpoint was saved before'):
        check_finite([torch.ones(3), torch.tensor([0.0, float('inf')])], config, 8, loss=1.0)


def test_network_weights_holding_nan_are_refused_before_any_model_loads(tiny_model_dir, tmp_path):
    """The run would start from NaN and stop at its first log as 'diverged', blaming the learning rate."""
    from train_helpers import break_weights, make_random_lora
    break_weights(make_random_lora(tiny_model_dir, str(tmp_path / 'lora')), float('inf'))
    with pytest.raises(ValueError, match=r"network_weights=.* holds NaN or inf in 1 of its \d+ weights \(e\.g\. "
                                         r'unet\..*\): the training that wrote it diverged'):
        LoraTrainConfig(dataset_name='test/x', network_weights=str(tmp_path / 'lora'))


def test_network_weights_start_the_adapter_where_a_trained_one_ends(tiny_model_dir, csv_dataset, tmp_path):
    """kohya's --network_weights: a diffusers or kohya file at another alpha starts the run with the same effect on
    the images; an adapter that does not fit is refused before any model loads."""
    from modelscope_sd import StableDiffusionText2ImagePipeline
    shape = dict(train_text_encoder=True, checkpointing_steps=None)
    first = tmp_path / 'first'
    _train(_config(tiny_model_dir, csv_dataset, first, learning_rate=5e-2, max_train_steps=2, lora_alpha=2,
                   export_kohya=True, **shape))
    base = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False)

    def image(lora_dir):
        pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False, lora_dir=lora_dir)
        return pipe('a photo', num_inference_steps=2, seed=0)['output_imgs'][0].astype(int)

    expected = image(str(first))
    assert np.abs(expected - base('a photo', num_inference_steps=2, seed=0)['output_imgs'][0].astype(int)).max() > 5
    for name, source in (('diffusers', first), ('kohya', first / 'pytorch_lora_weights_kohya.safetensors')):
        # a step at a learning rate of 1e-12 leaves the weights as they started
        _train(_config(tiny_model_dir, csv_dataset, tmp_path / name, learning_rate=1e-12, max_train_steps=1,
                       lora_alpha=8, network_weights=str(source), **shape))
        assert np.abs(image(str(tmp_path / name)) - expected).max() <= 1, name
    for settings, message in ((dict(rank=8, **shape), r'has rank \[4\], this run --rank 8: pass --rank 4'),
                              (dict(checkpointing_steps=None),
                               'holds text-encoder weights too: pass --train_text_encoder'),
                              (dict(target_modules='to_q,to_k', **shape), r'adapts modules outside --target_modules '
                                                                          r'to_q,to_k \(to_out.0, to_v, e.g.')):
        with pytest.raises(ValueError, match=message):
            LoraTrainConfig(dataset_name='test/x', network_weights=str(first), **settings)
    from safetensors.torch import save_file
    save_file({f'layer{i}.weight': torch.zeros(2, 2) for i in range(3)}, str(tmp_path / 'other.safetensors'))
    with pytest.raises(ValueError, match='holds no LoRA weights for the UNet or the text encoder'):
        LoraTrainConfig(dataset_name='test/x', network_weights=str(tmp_path / 'other.safetensors'))
    # the adapter finder's own refusals name this flag and the trainers' model flag, not the pipeline's lora_dir
    with pytest.raises(ValueError, match=r"network_weights='.*' is a whole Stable Diffusion model.*"
                                         r"--pretrained_model_name_or_path"):
        LoraTrainConfig(dataset_name='test/x', network_weights=tiny_model_dir)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match=r"network_weights='.*empty' holds no LoRA adapter.*"
                                                r"Point network_weights at"):
        LoraTrainConfig(dataset_name='test/x', network_weights=str(tmp_path / 'empty'))


def test_a_batch_size_past_the_dataset_is_said_to_hold_fewer_images(tiny_model_dir, tmp_path, caplog):
    make_images(str(tmp_path / 'one'), count=1)
    _train(_config(tiny_model_dir, str(tmp_path / 'one'), tmp_path / 'out', train_batch_size=4, max_train_steps=1,
                   checkpointing_steps=None))
    assert 'train_batch_size=4 but the dataset holds 1 example(s): every batch holds 1' in caplog.text


def test_dora_adapter_resumes_exactly_and_loads_here_and_in_diffusers(tiny_model_dir, csv_dataset, tmp_path,
                                                                    monkeypatch):
    """--use_dora: the file holds DoRA's magnitudes; a killed run resumes to the uninterrupted adapter; our pipeline
    and diffusers' load_lora_weights give one image; without the flag the file holds no magnitudes."""
    from diffusers import StableDiffusionPipeline

    from modelscope_sd import StableDiffusionText2ImagePipeline
    settings = dict(max_train_steps=4, checkpointing_steps=2, learning_rate=5e-2, use_dora=True,
                    train_text_encoder=True)
    uninterrupted = load_file(_train(_config(tiny_model_dir, csv_dataset, tmp_path / 'a', **settings)))
    assert any(k.endswith('lora_magnitude_vector') for k in uninterrupted)
    revive = kill_at_loss_call(monkeypatch, 3)  # step 3 of 4, after checkpoint-2
    with pytest.raises(Killed):
        _train(_config(tiny_model_dir, csv_dataset, tmp_path / 'b', **settings))
    revive()
    resumed = load_file(_train(_config(tiny_model_dir, csv_dataset, tmp_path / 'b', resume_from_checkpoint='latest',
                                       **settings)))
    _assert_same_adapter(resumed, uninterrupted)
    ours = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False,
                                             lora_dir=str(tmp_path / 'a'))('a photo', num_inference_steps=3, seed=0)
    vanilla = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    vanilla.load_lora_weights(str(tmp_path / 'a'))
    theirs = vanilla('a photo', num_inference_steps=3, output_type='np', generator=[torch.Generator().manual_seed(0)])
    assert np.abs(ours['output_imgs'][0].astype(int)
                  - (theirs.images[0] * 255).round().astype(int)[..., ::-1]).max() <= 1
    plain = load_file(_train(_config(tiny_model_dir, csv_dataset, tmp_path / 'lora',
                                     **dict(settings, use_dora=False))))
    assert not any('magnitude' in k for k in plain)
    with pytest.raises(ValueError, match='use_dora with export_kohya'):
        _config(tiny_model_dir, csv_dataset, tmp_path / 'x', use_dora=True, export_kohya=True)
    with pytest.raises(ValueError, match='use_dora with network_weights'):
        _config(tiny_model_dir, csv_dataset, tmp_path / 'x', use_dora=True, network_weights=str(tmp_path / 'a'))
