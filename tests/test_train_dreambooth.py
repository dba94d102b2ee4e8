"""DreamBooth on the tiny model: both modes, real prior preservation, exact resume, ModelScope's command line."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune.config import DreamBoothConfig
from train_helpers import Killed, kill_at_loss_call, make_images, reset_accelerate, run_launcher

INSTANCE_PROMPT, CLASS_PROMPT = 'a photo of sks dog', 'a photo of dog'


pytestmark = pytest.mark.usefixtures('fresh_accelerate')


@pytest.fixture(scope='module')
def instance_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('dog') / 'instance')
    make_images(folder, count=3, captions=False, prefix='dog')
    return folder


def _config(model, instance, out, **kwargs):
    defaults = dict(pretrained_model_name_or_path=model, instance_data_dir=instance, instance_prompt=INSTANCE_PROMPT,
                    output_dir=str(out), resolution=32, max_train_steps=4, checkpointing_steps=2, seed=5,
                    class_prompt=CLASS_PROMPT, num_class_images=2, class_inference_steps=2, sample_batch_size=2)
    return DreamBoothConfig(**{**defaults, **kwargs})


def _train(config):
    from finetune.train_dreambooth import main
    reset_accelerate()
    return main(config)


def _image(pipe, prompt=INSTANCE_PROMPT):
    return pipe(prompt, num_inference_steps=2, seed=0)['output_imgs'][0].astype(int)


def _bash(args, env, cwd):
    return run_launcher('run_train_dreambooth.sh', args, env, cwd)


def test_full_fine_tune_via_shell_loads_as_model_and_changes_the_image(tiny_model_dir, instance_dir, tmp_path,
                                                                         sd_pipe):
    import modelscope_sd
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    log = _bash(['--with_prior_preservation', '--num_class_images', '2', '--class_inference_steps', '2',
                 '--learning_rate', '1e-3', '--export_checkpoint'],
                {'MODEL': tiny_model_dir, 'INSTANCE_DIR': instance_dir, 'OUTPUT_DIR': str(tmp_path / 'out'),
                 'RESOLUTION': '32', 'MAX_TRAIN_STEPS': '3'}, tmp_path)
    assert f"Load it: pipeline(Tasks.text_to_image_synthesis, model={str(tmp_path / 'out')!r})" in log
    pipe = pipeline(task=Tasks.text_to_image_synthesis, model=str(tmp_path / 'out'), device='cpu')
    assert isinstance(pipe, modelscope_sd.StableDiffusionText2ImagePipeline)
    pipe.progress_bar = False
    trained = _image(pipe)
    assert np.abs(trained - _image(sd_pipe)).max() > 10
    assert len(os.listdir(tmp_path / 'out' / 'class_images')) == 2
    # --export_checkpoint: the same model as one original-layout fp16 file (A1111/ComfyUI), read back by diffusers
    single = modelscope_sd.StableDiffusionText2ImagePipeline(str(tmp_path / 'out' / 'out.safetensors'),
                                                             config=tiny_model_dir, device='cpu', progress_bar=False)
    assert np.abs(_image(single) - trained).max() <= 3  # fp16 weights; training moved pixels by far more (61)


def test_lora_mode_via_shell_loads_as_lora_dir(tiny_model_dir, instance_dir, tmp_path, sd_pipe):
    from modelscope_sd import StableDiffusionText2ImagePipeline
    _bash(['--use_lora', '--learning_rate', '5e-2', '--train_text_encoder', '--output_name', 'sks_dog'],
          {'MODEL': tiny_model_dir, 'INSTANCE_DIR': instance_dir, 'OUTPUT_DIR': str(tmp_path / 'out'),
           'RESOLUTION': '32', 'MAX_TRAIN_STEPS': '3'}, tmp_path)
    assert os.path.isfile(tmp_path / 'out' / 'pytorch_lora_weights.safetensors')
    assert os.path.isfile(tmp_path / 'out' / 'sks_dog.safetensors')  # kohya's --output_name: the A1111 file
    pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False,
                                             lora_dir=str(tmp_path / 'out'))
    assert np.abs(_image(pipe) - _image(sd_pipe)).max() > 0


def test_class_images_come_from_the_class_prompt_and_batches_hold_both(tiny_model_dir, instance_dir, tmp_path,
                                                                        monkeypatch, caplog):
    import finetune.training as training
    from modelscope_sd import StableDiffusionText2ImagePipeline
    prompts, batches = [], []
    real_call, real_loss = StableDiffusionText2ImagePipeline.__call__, training.denoising_loss

    def spy_call(self, input=None, **kwargs):
        prompts.append(input['text'])
        return real_call(self, input, **kwargs)

    def spy_loss(unet, text_encoder, vae, scheduler, batch, *args):
        batches.append({k: v.clone() for k, v in batch.items()})
        return real_loss(unet, text_encoder, vae, scheduler, batch, *args)

    monkeypatch.setattr(StableDiffusionText2ImagePipeline, '__call__', spy_call)
    monkeypatch.setattr(training, 'denoising_loss', spy_loss)
    _train(_config(tiny_model_dir, instance_dir, tmp_path / 'out', with_prior_preservation=True, num_class_images=3,
                   prior_loss_weight=0.25, train_batch_size=2, max_train_steps=2, checkpointing_steps=None))
    assert prompts and set(prompts) == {CLASS_PROMPT}
    class_dir = tmp_path / 'out' / 'class_images'
    assert sorted(os.listdir(class_dir)) == ['class-00000.png', 'class-00001.png', 'class-00002.png']
    made = Image.open(class_dir / 'class-00001.png').text
    assert (made['modelscope_sd.class_prompt'], made['modelscope_sd.class_model']) == (
        CLASS_PROMPT, os.path.abspath(tiny_model_dir))
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder='tokenizer')
    assert [len(b['loss_weight']) for b in batches] == [4, 2]  # 3 pairs at batch size 2
    for batch in batches:
        n = len(batch['loss_weight']) // 2
        assert batch['loss_weight'].tolist() == [1.0] * n + [0.25] * n
        captions = tokenizer.batch_decode(batch['input_ids'], skip_special_tokens=True)
        assert captions == [INSTANCE_PROMPT] * n + [CLASS_PROMPT] * n
    # a second run reuses the class images instead of generating again
    prompts.clear()
    _train(_config(tiny_model_dir, instance_dir, tmp_path / 'out2', with_prior_preservation=True, num_class_images=3,
                   class_data_dir=str(class_dir), max_train_steps=1, checkpointing_steps=None))
    assert prompts == [] and 'made by another model' not in caplog.text
    # ... and for another model (here: the same with another VAE), with a warning that says how to remake them
    with caplog.at_level('WARNING', logger='finetune.train_dreambooth'):
        _train(_config(tiny_model_dir, instance_dir, tmp_path / 'out4', with_prior_preservation=True,
                       num_class_images=3, class_data_dir=str(class_dir), max_train_steps=1, checkpointing_steps=None,
                       vae=tiny_model_dir))
    assert prompts == []
    assert f'3 class image(s) made by another model ({os.path.abspath(tiny_model_dir)}, e.g. class-00000.png)' \
        in caplog.text and 'with VAE' in caplog.text and 'delete them' in caplog.text
    # ... but not for another class: they would teach 'a photo of cat' what dogs look like
    with pytest.raises(ValueError, match="3 class image.*made for another class prompt \\('a photo of dog'"):
        _train(_config(tiny_model_dir, instance_dir, tmp_path / 'out3', with_prior_preservation=True,
                       num_class_images=3, class_data_dir=str(class_dir), class_prompt='a photo of cat',
                       instance_prompt='a photo of sks cat'))


def test_class_images_are_split_over_processes_and_refill_any_gap(tiny_model_dir, instance_dir, tmp_path,
                                                                   monkeypatch):
    """Several GPUs share the missing class images; image i is always seed + i, so a fill cut at any point
    (here: gaps in the middle, beside the user's own class photos) completes to the same pictures."""
    import finetune.train_dreambooth as dreambooth

    class Process:  # what generate_class_images reads of an Accelerator
        def __init__(self, index, count):
            self.process_index, self.num_processes, self.is_main_process = index, count, index == 0
            self.device = torch.device('cpu')

        def wait_for_everyone(self):
            pass

    config = _config(tiny_model_dir, instance_dir, tmp_path / 'out', with_prior_preservation=True,
                     num_class_images=7, sample_batch_size=2)
    shares = []
    monkeypatch.setattr(dreambooth, '_render_class_images', lambda config, device, runs: shares.append(runs))
    assert [dreambooth.generate_class_images(config, Process(i, 2)) for i in range(2)] == [4, 3]
    assert shares == [[(0, 2), (4, 2)], [(2, 2), (6, 1)]]  # every image once, batches round-robin
    monkeypatch.undo()
    dreambooth.generate_class_images(config, Process(0, 1))
    folder = config.class_data_dir
    full = {name: np.asarray(Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))}
    assert len(full) == 7
    for name in ('class-00002.png', 'class-00003.png', 'class-00005.png'):
        os.remove(os.path.join(folder, name))
    assert dreambooth.class_image_runs(config) == [(2, 2), (5, 1)]
    dreambooth.generate_class_images(config, Process(0, 1))
    assert all(np.array_equal(np.asarray(Image.open(os.path.join(folder, name))), image)
               for name, image in full.items())
    # your own class photos count towards num_class_images: with two, images 2-6 are the ones to make
    own = _config(tiny_model_dir, instance_dir, tmp_path / 'own', with_prior_preservation=True, num_class_images=7,
                  sample_batch_size=2)
    os.makedirs(own.class_data_dir)
    for name in ('dog-a.jpg', 'dog-b.jpg'):
        Image.new('RGB', (32, 32)).save(os.path.join(own.class_data_dir, name))
    assert dreambooth.class_image_runs(own) == [(2, 2), (4, 2), (6, 1)]


def test_prior_loss_is_instance_mean_plus_weighted_class_mean():
    from finetune.data import PriorPreservationDataset

    class Fixed(torch.utils.data.Dataset):
        def __init__(self, value):
            self.value = value

        def __len__(self):
            return 2

        def __getitem__(self, key):
            return {'pixel_values': torch.full((1,), self.value), 'input_ids': torch.zeros(1, dtype=torch.long)}

    data = PriorPreservationDataset(Fixed(1.0), Fixed(2.0), prior_loss_weight=0.5)
    batch = data.collate([data[(0, 0)], data[(0, 1)]])
    losses = torch.tensor([1.0, 3.0, 10.0, 20.0])  # two instance, two class samples
    loss = (losses * batch['loss_weight']).sum() / batch['is_instance'].sum()  # what the loop computes
    assert float(loss) == pytest.approx(2.0 + 0.5 * 15.0)


@pytest.mark.parametrize('optimizer, resumed', [
    (dict(optimizer='adamw'), {}), (dict(optimizer='adafactor'), {}), (dict(use_8bit_adam=True), {}),
    (dict(fused_backward_pass=True), {}), ({}, dict(fused_backward_pass=True)),
    (dict(full_bf16=True, mixed_precision='bf16'), {})],
    ids=['adamw', 'adafactor', '8bit', 'fused backward', 'resumed with fused backward', 'full bf16'])
def test_full_fine_tune_resume_matches_an_uninterrupted_run(tiny_model_dir, instance_dir, tmp_path, monkeypatch,
                                                            optimizer, resumed):
    settings = dict(max_train_steps=4, checkpointing_steps=2, learning_rate=1e-3, lr_scheduler='cosine', **optimizer)
    _train(_config(tiny_model_dir, instance_dir, tmp_path / 'a', **settings))
    revive = kill_at_loss_call(monkeypatch, 3)  # step 3 of 4, after checkpoint-2
    with pytest.raises(Killed):
        _train(_config(tiny_model_dir, instance_dir, tmp_path / 'b', **settings))
    revive()
    _train(_config(tiny_model_dir, instance_dir, tmp_path / 'b', resume_from_checkpoint='latest', **settings,
                   **resumed))
    weights = 'unet/diffusion_pytorch_model.safetensors'
    a, b = load_file(str(tmp_path / 'a' / weights)), load_file(str(tmp_path / 'b' / weights))
    base = load_file(os.path.join(tiny_model_dir, weights))
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it trained
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('group_bytes, max_grad_norm', [(64 * 2**10, 1e6), (None, 1e-4)],
                         ids=['small groups', 'one group, clipping'])
def test_fused_backward_pass_gives_the_plain_loops_weights_holding_a_group_of_gradients(
        tiny_model_dir, instance_dir, tmp_path, monkeypatch, group_bytes, max_grad_norm):
    """--fused_backward_pass steps the optimizer during backward, a group at a time, and frees those gradients. With
    no clipping biting, groups of 64 KiB (several per step on the tiny UNet) give the plain loop's weights to the
    bit; one group of all gradients (the tiny UNet is below the default size) clips as the plain loop does."""
    from finetune import fused_backward
    if group_bytes:
        monkeypatch.setattr(fused_backward, 'GROUP_BYTES', group_bytes)
    alive, flush = [], fused_backward.OptimizerInBackward.flush

    def counting_flush(self):
        if self.pending:
            alive.append(sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None))
        flush(self)

    monkeypatch.setattr(fused_backward.OptimizerInBackward, 'flush', counting_flush)
    settings = dict(max_train_steps=3, learning_rate=1e-3, max_grad_norm=max_grad_norm)
    _train(_config(tiny_model_dir, instance_dir, tmp_path / 'plain', **settings))
    assert not alive
    _train(_config(tiny_model_dir, instance_dir, tmp_path / 'fused', fused_backward_pass=True, **settings))
    weights = 'unet/diffusion_pytorch_model.safetensors'
    plain, fused = load_file(str(tmp_path / 'plain' / weights)), load_file(str(tmp_path / 'fused' / weights))
    base = load_file(os.path.join(tiny_model_dir, weights))
    assert any(not torch.equal(plain[k], base[k]) for k in plain)  # it trained
    for key in plain:
        assert torch.equal(fused[key], plain[key]), key
    all_gradients = sum(v.numel() * 4 for v in base.values())
    if group_bytes:
        largest = max(v.numel() * 4 for v in base.values())
        assert len(alive) >= 3 * 4  # several groups per step
        assert max(alive) <= group_bytes + largest < all_gradients / 4
    else:
        assert alive == [all_gradients] * 3


def test_fused_backward_pass_is_refused_where_accelerates_config_sets_fp16_or_several_processes(
        instance_dir, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from finetune import training
    config = _config('test/unused', instance_dir, tmp_path / 'out', fused_backward_pass=True)
    for precision, processes, message in (('fp16', 1, '--mixed_precision bf16'), ('bf16', 2, 'with 2 processes')):
        accelerator = SimpleNamespace(mixed_precision=precision, num_processes=processes)
        monkeypatch.setattr(training, 'make_accelerator', lambda config: accelerator)
        with pytest.raises(ValueError, match=f'fused_backward_pass: .*{message}'):
            training.start_run(config)
    accelerator = SimpleNamespace(mixed_precision='bf16', num_processes=1)
    assert training.start_run(config) is accelerator


@pytest.mark.parametrize('accumulation', [1, 4])
def test_full_bf16_trains_bf16_weights_as_the_fp32_weights_train(tiny_model_dir, instance_dir, tmp_path, accumulation):
    """--full_bf16: the UNet trains and is saved in bf16, its change that of the fp32 weights' run (both under bf16
    autocast) but for the rounding; the saved model loads and draws. Rounding to nearest instead would keep most
    weights where they were at this learning rate (test_stochastic_adamw.py). With gradient accumulation the
    micro-batches' gradients add up in bf16, as in kohya's; the cosine was 0.982 either way."""
    from modelscope_sd import StableDiffusionText2ImagePipeline
    settings = dict(max_train_steps=4, checkpointing_steps=None, learning_rate=1e-3, mixed_precision='bf16',
                    gradient_accumulation_steps=accumulation)
    _train(_config(tiny_model_dir, instance_dir, tmp_path / 'fp32', **settings))
    _train(_config(tiny_model_dir, instance_dir, tmp_path / 'bf16', full_bf16=True, **settings))
    weights = 'unet/diffusion_pytorch_model.safetensors'
    base = load_file(os.path.join(tiny_model_dir, weights))
    changes = {}
    for name in ('fp32', 'bf16'):
        trained = load_file(str(tmp_path / name / weights))
        assert {t.dtype for t in trained.values()} == {torch.float32 if name == 'fp32' else torch.bfloat16}
        changes[name] = torch.cat([(trained[k].float() - base[k].float()).flatten() for k in base])
    assert torch.nn.functional.cosine_similarity(changes['fp32'], changes['bf16'], dim=0) > 0.95
    assert changes['bf16'].norm() == pytest.approx(changes['fp32'].norm().item(), rel=0.05)
    pipe = StableDiffusionText2ImagePipeline(str(tmp_path / 'bf16'), device='cpu', progress_bar=False)
    before = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False)
    assert np.abs(_image(pipe) - _image(before)).max() > 0


def test_full_bf16_is_refused_where_accelerates_config_sets_another_precision(instance_dir, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from finetune import training
    config = _config('test/unused', instance_dir, tmp_path / 'out', full_bf16=True)  # precision from accelerate's config
    for precision in ('no', 'fp16'):
        monkeypatch.setattr(training, 'make_accelerator',
                            lambda config: SimpleNamespace(mixed_precision=precision, num_processes=1))
        with pytest.raises(ValueError, match=f"full_bf16: .*'{precision}': pass --mixed_precision bf16"):
            training.start_run(config)


def test_kohyas_full_bf16_is_a_dreambooth_flag(instance_dir, tmp_path):
    from finetune.flags import parse_args
    config, _ = parse_args(DreamBoothConfig, ['--instance_data_dir', instance_dir, '--instance_prompt', INSTANCE_PROMPT,
                                              '--output_dir', str(tmp_path), '--mixed_precision', 'bf16',
                                              '--full_bf16'], 'x')
    assert config.full_bf16


def test_kohyas_fused_backward_pass_is_a_dreambooth_flag_and_changes_nothing_for_an_adapter(instance_dir, tmp_path):
    from finetune.config import LoraTrainConfig
    from finetune.flags import parse_args
    config, _ = parse_args(DreamBoothConfig, ['--instance_data_dir', instance_dir, '--instance_prompt', INSTANCE_PROMPT,
                                              '--output_dir', str(tmp_path), '--fused_backward_pass'], 'x')
    assert config.fused_backward_pass
    config, notes = parse_args(LoraTrainConfig, ['--train_data_dir', instance_dir, '--fused_backward_pass'], 'x')
    assert not hasattr(config, 'fused_backward_pass')
    assert "--fused_backward_pass true: accepted, no effect here (an adapter's gradients are a few MB" in notes[0]


def test_out_of_memory_advice_names_the_fused_backward_pass_for_a_full_fine_tune(instance_dir, tmp_path):
    from finetune.training import memory_advice

    def advice(processes=1, **kwargs):
        return memory_advice(_config('test/unused', instance_dir, tmp_path / 'out', **kwargs), 'bf16', processes)

    assert '--fused_backward_pass' in advice()
    assert '--fused_backward_pass' not in advice(fused_backward_pass=True)
    assert '--fused_backward_pass' not in advice(use_lora=True)
    assert '--fused_backward_pass' not in advice(gradient_accumulation_steps=2)
    assert '--fused_backward_pass' not in advice(processes=2)  # it would be refused there
    assert '--full_bf16' in advice()
    assert '--full_bf16' not in advice(full_bf16=True) + advice(use_lora=True) + advice(use_8bit_adam=True)
    assert '--use_8bit_adam or --optimizer adafactor' not in advice(full_bf16=True)  # refused together


def test_gradient_checkpointing_turns_off_autocasts_weight_cache(instance_dir, tmp_path):
    """autocast keeps a bf16 copy of each fp32 weight until the forward ends, also of checkpointed blocks' weights."""
    from finetune.training import make_accelerator

    def autocast_handler(checkpointing):
        return make_accelerator(_config('test/unused', instance_dir, tmp_path, gradient_checkpointing=checkpointing)
                                ).autocast_handler

    assert autocast_handler(False) is None  # torch's default: cached
    assert autocast_handler(True).cache_enabled is False


def test_memory_optimizers_keep_a_fraction_of_adamws_state(tiny_model_dir, instance_dir, tmp_path):
    """The memory options for full fine-tunes: AdamW keeps two fp32 tensors per weight; Adafactor factored
    row/column statistics (for SD1.5's UNet: 2.0 GiB against 6.4 GiB); 8-bit AdamW one byte per moment."""
    from diffusers import UNet2DConditionModel

    from finetune.training import make_optimizer
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder='unet')
    params = list(unet.parameters())
    weights = sum(p.numel() * 4 for p in params)
    state = {}
    options = {'adamw': {}, 'adafactor': {'optimizer': 'adafactor'}, '8bit': {'use_8bit_adam': True}}
    for name, option in options.items():
        optimizer = make_optimizer(_config('test/unused', instance_dir, tmp_path, **option), params,
                                   torch.device('cpu'), 1e-4)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        state[name] = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                          if torch.is_tensor(t) and t.dim() > 0)
    assert state['adamw'] == 2 * weights
    assert state['adafactor'] < state['adamw'] / 3  # 0.25 here, 0.27 for SD1.5
    assert state['8bit'] < state['adamw'] / 3  # small tensors stay 32-bit


def test_modelscope_example_command_line_runs_unchanged(tiny_model_dir, instance_dir, tmp_path):
    work_dir = str(tmp_path / 'tmp' / 'dreambooth_diffusion')
    log = _bash(['--model', tiny_model_dir, '--model_revision', 'v1.0.8', '--work_dir', work_dir,
                 '--train_dataset_name', instance_dir, '--with_prior_preservation', 'false',
                 '--instance_prompt', 'a photo of sks dog', '--class_prompt', 'a photo of dog',
                 '--class_data_dir', str(tmp_path / 'tmp' / 'class_data'), '--num_class_images', '200',
                 '--resolution', '32', '--prior_loss_weight', '1.0', '--prompt', 'dog', '--max_epochs', '1',
                 '--save_ckpt_strategy', 'by_epoch', '--logging_interval', '1',
                 '--train.dataloader.workers_per_gpu', '0', '--evaluation.dataloader.workers_per_gpu', '0',
                 '--train.optimizer.lr', '5e-6', '--use_model_config', 'true'], {}, tmp_path)
    assert '--work_dir' in log and 'accepted, no effect here' in log
    output = os.path.join(work_dir, 'output')
    assert os.path.isfile(os.path.join(output, 'model_index.json'))
    assert os.path.isfile(os.path.join(output, 'configuration.json'))
    assert Image.open(tmp_path / 'dreambooth_result.png').size == (32, 32)


def test_a_checkpoint_of_the_other_kind_is_refused_by_what_it_holds(tiny_model_dir, instance_dir, tmp_path):
    """Before: a LoRA trainer's checkpoint resumed as a full fine-tune (same learning rate) failed deep in accelerate
    with "No such file or directory: .../pytorch_model.bin"."""
    import json

    from finetune.config import LoraTrainConfig
    from finetune.train_lora import main as train_lora
    make_images(str(tmp_path / 'captioned'))
    lora = dict(pretrained_model_name_or_path=tiny_model_dir, train_data_dir=str(tmp_path / 'captioned'),
                output_dir=str(tmp_path / 'lora'), resolution=32, learning_rate=5e-6)
    reset_accelerate()
    train_lora(LoraTrainConfig(**lora, max_train_steps=1, checkpointing_steps=1))
    full = dict(resume_from_checkpoint='latest', learning_rate=5e-6)
    with pytest.raises(ValueError, match=r'checkpoint-1 holds LoRA adapters, and this run trains a whole UNet \(a '
                                         r'DreamBooth full fine-tune\): resume it with the trainer and flags that saved'):
        _train(_config(tiny_model_dir, instance_dir, tmp_path / 'lora', **full))
    state_file = tmp_path / 'lora' / 'checkpoint-1' / 'training_state.json'  # as saved before use_lora was recorded
    state = json.loads(state_file.read_text())
    del state['settings']['use_lora']
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match='checkpoint-1 holds LoRA adapters, and this run trains a whole UNet'):
        _train(_config(tiny_model_dir, instance_dir, tmp_path / 'lora', **full))
    with pytest.raises(ValueError, match='checkpoint-1 holds a whole UNet .*, and this run trains LoRA adapters'):
        state['settings'] = {'use_lora': False, 'learning_rate': 5e-6}
        state_file.write_text(json.dumps(state))
        train_lora(LoraTrainConfig(**lora, max_train_steps=2, resume_from_checkpoint='latest'))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize('kwargs, error, message', [
    (dict(instance_data_dir='/no/such/folder'), FileNotFoundError, 'instance_data_dir=.*no such folder'),
    (dict(instance_data_dir=None), ValueError, 'No instance images'),
    (dict(with_prior_preservation=True, class_prompt=None), ValueError, 'needs --class_prompt'),
    (dict(num_class_images=0), ValueError, 'num_class_images=0 must be >= 1'),
    (dict(identifier='xyz'), ValueError, "does not contain the identifier 'xyz'"),
    (dict(identifier='sks', with_prior_preservation=True, class_prompt='a photo of sks'), ValueError,
     'contains the identifier'),
    (dict(instance_prompt=None), ValueError, 'instance_prompt is required'),
    (dict(optimizer='sgd'), ValueError, "optimizer='sgd' is not one of"),
    (dict(optimizer='adafactor', use_8bit_adam=True), ValueError, 'use_8bit_adam applies to optimizer=adamw'),
    (dict(use_lora=True, export_checkpoint=True), ValueError, 'pass --export_kohya'),
    (dict(with_prior_preservation=True, class_data_dir='INSTANCE'), ValueError, 'is instance_data_dir='),
    (dict(with_prior_preservation=True, class_data_dir='INSTANCE/dogs'), ValueError,
     "class_data_dir='.*/dogs' is inside instance_data_dir=.*Pass a --class_data_dir outside"),
    (dict(output_dir='INSTANCE/out'), ValueError, "output_dir='.*/out' is inside instance_data_dir="),
    (dict(with_prior_preservation=True, enable_bucket=True), ValueError, 'enable_bucket does not combine'),
    (dict(network_weights='some-lora'), ValueError, 'network_weights starts the LoRA adapters .*pass --use_lora'),
    (dict(use_lora=True, network_weights='/no/such/lora'), FileNotFoundError, 'network_weights=.*no such file'),
    (dict(fused_backward_pass=True, use_lora=True), ValueError, 'fused_backward_pass: .*train the whole UNet'),
    (dict(fused_backward_pass=True, gradient_accumulation_steps=2), ValueError,
     'fused_backward_pass: .*--gradient_accumulation_steps 2: pass 1'),
    (dict(fused_backward_pass=True, mixed_precision='fp16'), ValueError,
     'fused_backward_pass: .*--mixed_precision bf16'),
    (dict(fused_backward_pass=True, torch_compile=True), ValueError, "fused_backward_pass: a compiled UNet's backward"),
    (dict(full_bf16=True, use_lora=True), ValueError, r'full_bf16: .*train the whole UNet \(no --use_lora\)'),
    (dict(full_bf16=True, use_8bit_adam=True), ValueError, 'full_bf16: .*not --use_8bit_adam: drop --use_8bit_adam'),
    (dict(full_bf16=True, optimizer='adafactor'), ValueError, 'full_bf16: .*drop --optimizer adafactor'),
    (dict(full_bf16=True, mixed_precision='fp16'), ValueError,
     "full_bf16: .*mixed precision 'fp16': pass --mixed_precision bf16, or drop --full_bf16"),
    (dict(instance_data_dir=None, dataset_name='/no/such/photos'), FileNotFoundError,
     "dataset_name='/no/such/photos': no such folder, and not a ModelScope dataset id"),
    (dict(with_prior_preservation=True, class_prompt='a photo of dog', class_data_dir='FILE'), ValueError,
     r"class_data_dir='.*notes.txt' is a file: pass a folder"),
    (dict(pretrained_model_name_or_path='./no-such-model'), FileNotFoundError,
     "pretrained_model_name_or_path='./no-such-model': no such folder, and not a ModelScope model id"),
])
def test_bad_config(instance_dir, tmp_path, kwargs, error, message):
    kwargs = {k: v.replace('INSTANCE/', instance_dir + '/') if isinstance(v, str) else v for k, v in kwargs.items()}
    if kwargs.get('class_data_dir') == 'INSTANCE':
        kwargs = {**kwargs, 'class_data_dir': instance_dir + '/'}  # the same folder, spelled differently
    if kwargs.get('class_data_dir') == 'FILE':
        (tmp_path / 'notes.txt').write_text('not a folder')
        kwargs = {**kwargs, 'class_data_dir': str(tmp_path / 'notes.txt')}
    with pytest.raises(error, match=message):
        _config('test/unused', instance_dir, kwargs.pop('output_dir', tmp_path / 'out'), **kwargs)


def test_output_name_names_the_file_for_a1111_a_checkpoint_or_an_adapter(instance_dir, tmp_path):
    from finetune.train_dreambooth import checkpoint_file_name
    full = _config('test/unused', instance_dir, tmp_path / 'out', output_name='sks_dog')
    assert (full.export_checkpoint, full.export_kohya, checkpoint_file_name(full)) == (True, False, 'sks_dog.safetensors')
    assert checkpoint_file_name(_config('test/unused', instance_dir, tmp_path / 'out')) == 'out.safetensors'
    lora = _config('test/unused', instance_dir, tmp_path / 'out', output_name='sks_dog', use_lora=True)
    assert (lora.export_checkpoint, lora.export_kohya) == (False, True)


def test_class_prompt_without_prior_preservation_is_reported(instance_dir, tmp_path, caplog):
    with caplog.at_level('WARNING', logger='finetune.config'):
        _config('test/unused', instance_dir, tmp_path / 'out')  # class_prompt set, with_prior_preservation off
    assert 'with_prior_preservation is off: no class images are used' in caplog.text


def test_empty_instance_folder(tiny_model_dir, tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='holds no images'):
        _train(_config(tiny_model_dir, str(tmp_path / 'empty'), tmp_path / 'out'))


def test_output_dir_holding_a_run_is_refused(tiny_model_dir, instance_dir, tmp_path):
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'model_index.json').write_text('{}')
    with pytest.raises(ValueError, match='already holds a run'):
        _train(_config(tiny_model_dir, instance_dir, tmp_path / 'out'))


def test_vae_flag_encodes_with_that_vae_and_the_full_model_is_saved_with_it(tiny_model_dir, instance_dir, tmp_path,
                                                                           monkeypatch):
    """kohya's --vae: the training latents (here cached, so encoded before the first step) come from the given
    VAE, the class images and the saved model use it, and the saved model loads with it."""
    from diffusers import AutoencoderKL
    base = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder='vae')
    torch.manual_seed(1)
    AutoencoderKL.from_config(base.config).save_pretrained(tmp_path / 'vae')
    encoders = []
    real = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, 'encode', lambda self, x, **kw: encoders.append(self) or real(self, x, **kw))
    out = _train(_config(tiny_model_dir, instance_dir, tmp_path / 'out', vae=str(tmp_path / 'vae'), max_train_steps=2,
                         checkpointing_steps=None, cache_latents=True, center_crop=True))
    given = AutoencoderKL.from_pretrained(tmp_path / 'vae').state_dict()
    assert encoders and all(torch.equal(vae.state_dict()['encoder.conv_in.weight'], given['encoder.conv_in.weight'])
                            for vae in encoders)
    saved = AutoencoderKL.from_pretrained(out, subfolder='vae').state_dict()
    assert all(torch.equal(saved[k], given[k]) for k in given)
    with pytest.raises(ValueError, match="vae='nope.safetensors': no such file or folder"):
        _config(tiny_model_dir, instance_dir, tmp_path / 'x', vae='nope.safetensors')
