"""Tiny training data and in-process trainer runs for the trainer tests."""

import csv
import os
import subprocess

import numpy as np
from PIL import Image


def make_images(folder, count=4, size=40, seed=0, captions=True, prefix='img'):
    """Coloured gradient images with a .txt caption each."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        base = rng.integers(0, 255, size=3)
        ramp = np.linspace(0, 80, size)[None, :, None]
        array = np.clip(base[None, None, :] + ramp + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f'{prefix}{i}.png')
        Image.fromarray(array).save(path)
        if captions:
            with open(os.path.splitext(path)[0] + '.txt', 'w') as f:
                f.write(f'a photo of thing number {i}')
        paths.append(path)
    return paths


def make_modelscope_csv_dataset(folder, train=4, validation=2):
    """The layout of buptwq/lora-stable-diffusion-finetune: {split}.csv with Text and Target:FILE."""
    for split, count in (('train', train), ('validation', validation)):
        images = make_images(os.path.join(folder, split), count, seed=len(split), captions=False)
        with open(os.path.join(folder, f'{split}.csv'), 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(['Text', 'Target:FILE'])
            for i, path in enumerate(images):
                writer.writerow([f'a {split} photo {i}', os.path.relpath(path, folder)])
    return folder


def reset_accelerate():
    """accelerate keeps process-wide state; each in-process run starts from scratch."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_random_lora(model_dir, out_dir, seed=0, rank=4, text_encoder=False, scale=1.0):
    """An adapter with non-zero A and B (peft's init_lora_weights=False), so it visibly changes images,
    written by the trainer's own save path."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from finetune.models import TEXT_ENCODER_TARGETS, add_lora, save_lora
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder='unet')
    add_lora(unet, rank, rank, 0.0, ['to_q', 'to_k', 'to_v', 'to_out.0'], init=False)
    te = None
    if text_encoder:
        te = CLIPTextModel.from_pretrained(model_dir, subfolder='text_encoder')
        add_lora(te, rank, rank, 0.0, TEXT_ENCODER_TARGETS, init=False)
    with torch.no_grad():
        for module in (unet, te):
            for name, param in (module.named_parameters() if module is not None else []):
                if 'lora_' in name:
                    param.mul_(scale)
    return save_lora(out_dir, unet, te)


def break_weights(path, value=float('nan')):
    """Write ``value`` (NaN, inf) into the first weight of the safetensors file at ``path``, as a diverged training
    leaves its adapter."""
    from safetensors.torch import load_file, save_file
    weights = load_file(path)
    weights[sorted(weights)[0]][0, 0] = value
    save_file(weights, path)
    return path


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_launcher(script, args, env, cwd):
    """Run finetune/<script> as a user would (bash, accelerate launch); returns stdout + stderr."""
    result = subprocess.run(['bash', os.path.join(REPO, 'finetune', script), *args], cwd=cwd,
                            env={**os.environ, 'TMPDIR': str(cwd), **env},  # torch's launcher leaves a folder there
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


class Killed(Exception):
    """Stands in for a kill (Ctrl-C, OOM, preemption) at a chosen point of a training run."""


def at_loss_calls(monkeypatch, calls, action):
    """Run ``action()`` at each of the given forward passes (1-based; repeats run it again) of the training
    loss, before the pass; returns the undo."""
    import finetune.training as training
    real_loss, count = training.denoising_loss, []

    def wrapped(*args, **kwargs):
        count.append(1)
        for _ in range(calls.count(len(count))):
            action()
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, 'denoising_loss', wrapped)
    return lambda: monkeypatch.setattr(training, 'denoising_loss', real_loss)


def kill_at_loss_call(monkeypatch, call: int):
    """Make the ``call``-th forward pass of the training loss raise ``Killed``; returns the undo."""
    def dies():
        raise Killed
    return at_loss_calls(monkeypatch, [call], dies)


def signal_at_loss_calls(monkeypatch, signum, calls):
    """Send this process ``signum`` (a real signal, as Ctrl-C or a scheduler would) at each of the given
    forward passes of the training loss; every pass still runs."""
    import signal
    return at_loss_calls(monkeypatch, calls, lambda: signal.raise_signal(signum))
