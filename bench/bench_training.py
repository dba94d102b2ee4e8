"""Training benchmark: our LoRA and DreamBooth steps against a diffusers-example-style loop, same card, same run.

    python bench/bench_training.py                       # SD1.5 architecture, 512x512
    python bench/bench_training.py --device cpu --tiny   # dry run on the tiny model

"vanilla" is what diffusers' train_text_to_image_lora.py / train_dreambooth.py do per step: fp16 autocast,
VAE encode and text encoder every step, plain AdamW. "ours" is finetune.training.train_loop with the fast
options: --cache_latents, --mixed_precision bf16, fused AdamW (and --gradient_checkpointing where named).
Images/s is measured over --steps steady-state optimizer steps (a run of warmup + steps steps, less a run of
warmup steps, so per-run setup cancels); peak memory over the longer run.
"""

import argparse
import atexit
import gc
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from bench.models import build_components, environment  # noqa: E402
from bench.profiling import device_profile, timed, trace_path  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--tiny', action='store_true')
    parser.add_argument('--steps', type=int, default=30)
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--only', default='lora,dreambooth',
                        help='comma-separated: lora, dreambooth, compile (the --torch_compile rows)')
    parser.add_argument('--profile', action='store_true',
                        help='also profile --profile_steps steps of each row: where the device time goes')
    parser.add_argument('--profile_steps', type=int, default=10)
    parser.add_argument('--trace_dir', default=None,
                        help="also write each profiled run's timeline to this folder (gzipped Chrome traces)")
    parser.add_argument('--out', default=None)
    return parser.parse_args(argv)


def make_data(folder, count, size):
    from finetune.data import records_from_image_folder
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(f'{folder}/{i}.png')
        with open(f'{folder}/{i}.txt', 'w') as f:
            f.write(f'a photo of thing {i}')
    return records_from_image_folder(folder)


def _peak(device):
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith('cuda') else None


def _reset(device):
    """Free the previous run. Its Accelerator, optimizer and closures form reference cycles: without
    gc.collect() their tensors stay allocated and count in the next run's peak (seen on the first H200 run)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    gc.collect()
    if device.startswith('cuda'):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def vanilla_step_runner(parts, mode, batch, device, records, resolution):
    """The per-step work of diffusers' example scripts, written out as they do it."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from finetune.data import CaptionDataset, EpochSampler, collate
    accelerator = Accelerator(mixed_precision='fp16' if device.startswith('cuda') else 'no')
    unet, vae, text_encoder = parts['unet'], parts['vae'], parts['text_encoder']
    low = torch.float16 if device.startswith('cuda') else torch.float32
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    vae.to(device, low)
    text_encoder.to(device, low)
    if mode == 'lora':
        unet.to(device, low)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights='gaussian',
                                    target_modules=['to_k', 'to_q', 'to_v', 'to_out.0']))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
    else:
        unet.to(device)
        unet.requires_grad_(True)
        params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear')
    dataset = CaptionDataset(records, parts['tokenizer'], resolution, center_crop=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=EpochSampler(len(dataset), 0),
                                         collate_fn=collate)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)

    def run(steps):
        done = 0
        while done < steps:
            for data in loader:
                latents = vae.encode(data['pixel_values'].to(low)).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                t = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
                noisy = scheduler.add_noise(latents, noise, t)
                states = text_encoder(data['input_ids'], return_dict=False)[0]
                pred = unet(noisy, t, states, return_dict=False)[0]
                loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad()
                done += 1
                if done == steps:
                    break
    return run


def ours_step_runner(parts, mode, batch, device, records, resolution, options):
    from diffusers import DDPMScheduler

    from finetune.config import DreamBoothConfig, LoraTrainConfig
    from finetune.data import CaptionDataset
    from finetune.training import make_accelerator, prepare_models, train_loop
    # the models and images come in parts: the config only checks that these folders exist
    folder, out = _temporary_folder('bench_in_'), _temporary_folder('bench_out_')
    defaults = dict(pretrained_model_name_or_path=folder, output_dir=out, resolution=resolution, center_crop=True,
                    cache_latents=True, mixed_precision='bf16' if device.startswith('cuda') else 'no',
                    train_batch_size=batch, checkpointing_steps=None, validation_steps=10**9, logging_steps=10**9)
    common = {**defaults, **options}
    if mode == 'lora':
        config = LoraTrainConfig(dataset_name=folder, **common)
    else:
        config = DreamBoothConfig(instance_data_dir=folder, instance_prompt='a photo of sks thing', **common)
    accelerator = make_accelerator(config)
    parts = dict(parts, noise_scheduler=DDPMScheduler(beta_start=0.00085, beta_end=0.012,
                                                     beta_schedule='scaled_linear'), model_dir=None)
    trained = prepare_models(accelerator, config, parts, lora=(mode == 'lora'))
    dataset = CaptionDataset(records, parts['tokenizer'], resolution, center_crop=True)

    def run(steps):
        config.max_train_steps = steps
        train_loop(accelerator, config, parts, trained, dataset)
        # the accelerator keeps every optimizer it prepared: without this, the timed run's peak memory held the
        # state of the runs before it (2 x 3.2 GiB of 8-bit AdamW state in the H200 run of 2026-11-27)
        accelerator.free_memory()
    return run


def _temporary_folder(prefix: str) -> str:
    """Removed when the bench exits."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def measure(name, runner, args, batch, results):
    """Steady-state steps only: our runner is a whole train_loop run, whose setup (caching the latents, prepare,
    a new optimizer) would count against us in a single timing. The time of warmup + steps steps minus that of
    warmup steps cancels it, and vanilla is timed the same way."""
    runner(args.warmup)  # compilation, cuDNN/cuBLAS selection, allocator warm-up
    short = timed(lambda: runner(args.warmup), args.device)[0]
    if args.device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() / 2**30 if args.device.startswith('cuda') else None
    elapsed = timed(lambda: runner(args.warmup + args.steps), args.device)[0] - short
    row = {'name': name, 'batch': batch, 'it_per_s': round(args.steps / elapsed, 2) if elapsed > 0 else None,
           'images_per_s': round(args.steps * batch / elapsed, 2) if elapsed > 0 else None,
           'peak_mem_gib': _peak(args.device),
           'allocated_before_gib': round(baseline, 2) if baseline is not None else None}
    if elapsed <= 0:  # a number would be the setup's noise, not the steps' speed
        row['note'] = (f'the longer run took {-elapsed:.3f} s less than the shorter: its setup varied more than '
                       f'{args.steps} steps take; pass more --steps')
    emit(row, args, results)
    if args.profile:
        # one step's share of two runs (ours: whole train_loop runs, whose setup cancels as in the timing)
        emit(dict(device_profile(name, lambda: runner(args.warmup + args.profile_steps), args.device,
                                 baseline=lambda: runner(args.warmup), steps=args.profile_steps,
                                 trace=trace_path(args.trace_dir, name) if batch == 1 else None),
                  steps=args.profile_steps), args, results)


def emit(row, args, results):
    results.append(row)
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, 'a') as f:
            f.write(json.dumps(row) + '\n')


def plan_runs(only):
    """(name, mode, batch, options of our trainer or None for the vanilla-style loop). The rows that answer the
    GPU issue's goals run first, so that a run cut short by its time limit still has them: per goal the vanilla row,
    then ours, which with 'compile' in ``only`` is the compiled row (the loops are host-bound on the H200
    machines, GPU busy 15-30%: fewer, fused kernels; for LoRA, replayed as CUDA graphs). The other rows of ours
    follow."""
    compiled = 'compile' in only
    ours_lora = ('ours LoRA r4 (cached latents, bf16, fused AdamW)', {})
    # forward and backward replayed as two CUDA graphs: the host's ~4,400 launches per step become a few
    graphs = {'torch_compile': True, 'torch_compile_mode': 'reduce-overhead'}
    graphed_lora = ('ours LoRA r4 + --torch_compile --torch_compile_mode reduce-overhead', graphs)
    compiled_lora = ('ours LoRA r4 + --torch_compile', {'torch_compile': True})
    lora_goal = [('vanilla LoRA r4', None), graphed_lora if compiled else ours_lora]
    lora_other_ways = [compiled_lora, ours_lora] if compiled else []  # after the goal row, at each batch
    # bf16 against vanilla's fp16 at batch 1: ours was 0.63x vanilla in the first H200 run of 2026-11-27 and 1.13x
    # in the second, while vanilla itself went from 6.97 to 4.35 it/s (host speed)
    lora_more = lora_other_ways + [
        ('ours LoRA r4, fp16 like vanilla (cached latents, fused AdamW)', {'mixed_precision': 'fp16'})]
    # bf16 weights and gradients, fp32 AdamW moments, stochastic rounding: 10.4 GiB estimated on the CPU against
    # 13.4 for fp32 weights, and 151 casts per forward and backward against 1,087
    full_bf16 = {'full_bf16': True, 'mixed_precision': 'bf16'}
    dreambooth_goal = [('vanilla DreamBooth full UNet', None), ('ours DreamBooth full UNet + --full_bf16', full_bf16)]
    if compiled:  # and its forward and backward replayed as CUDA graphs: the launches left are the optimizer's chunks
        dreambooth_goal.append(('ours DreamBooth full UNet + --full_bf16 + --torch_compile reduce-overhead',
                                {**full_bf16, **graphs}))
    # full-precision AdamW that never holds all its gradients nor all of autocast's bf16 weight copies (10.6 GiB
    # estimated on the CPU), and 8-bit AdamW, which ran at 0.85-0.94x vanilla's it/s on the H200
    fused = {'fused_backward_pass': True}
    dreambooth_more = [('ours DreamBooth full UNet + --fused_backward_pass --gradient_checkpointing',
                        {**fused, 'gradient_checkpointing': True}),
                       ('ours DreamBooth full UNet + --fused_backward_pass', fused)]
    if importlib.util.find_spec('bitsandbytes'):
        eight_bit = ('ours DreamBooth full UNet + --use_8bit_adam', {'use_8bit_adam': True})
        if compiled:  # fewer launches for the forward and backward, to pay for 8-bit AdamW's 686 per-tensor ones
            dreambooth_more += [('ours DreamBooth full UNet + 8-bit AdamW + --torch_compile reduce-overhead',
                                 {'use_8bit_adam': True, **graphs}),
                                ('ours DreamBooth full UNet + 8-bit AdamW + --torch_compile',
                                 {'use_8bit_adam': True, 'torch_compile': True})]
        dreambooth_more.append(eight_bit)
    dreambooth_more += [('ours DreamBooth full UNet + --optimizer adafactor', {'optimizer': 'adafactor'}),
                        ('ours DreamBooth full UNet (cached latents, bf16, fused AdamW)', {}),
                        ('ours DreamBooth full UNet + adafactor + gradient checkpointing',
                         {'optimizer': 'adafactor', 'gradient_checkpointing': True})]
    lora_batched = lora_goal + lora_other_ways
    order = [('lora', 1, lora_goal), ('dreambooth', 1, dreambooth_goal), ('lora', 1, lora_more),
             ('dreambooth', 1, dreambooth_more), ('lora', 4, lora_batched)]
    return [(name, mode, batch, options) for mode, batch, rows in order if mode in only for name, options in rows]


def main(argv=None):
    args = parse_args(argv)
    resolution = 32 if args.tiny else 512
    results = []
    print(json.dumps({'name': 'environment', **environment(), 'resolution': resolution}), flush=True)
    records = make_data(_temporary_folder('bench_data_'), 8, resolution)
    runs = plan_runs(args.only.split(','))
    for name, mode, batch, options in runs:
        started = time.perf_counter()
        _reset(args.device)
        parts = build_components(args.tiny, args.device)  # fresh weights on the card for every run
        built = time.perf_counter()
        try:
            if options is None:
                runner = vanilla_step_runner(parts, mode, batch, args.device, records, resolution)
            else:
                runner = ours_step_runner(parts, mode, batch, args.device, records, resolution, options)
            measure(name, runner, args, batch, results)
        except Exception as error:  # one GPU session per task: one failing row must not cost the others
            emit({'name': name, 'batch': batch, 'error': f'{type(error).__name__}: {error}'[-2000:]}, args, results)
        # where a GPU session's minutes go: the H200 run of 2026-11-27 spent ~80 s per row, the timed steps ~5 s of it
        print(f'# {name}, batch {batch}: {time.perf_counter() - started:.0f} s for the row, '
              f'{built - started:.0f} s of it building the weights', flush=True)
        runner = None
        del parts
        _reset(args.device)
    print('\n| run | batch | it/s | images/s | peak GiB |\n|---|---|---|---|---|')
    for row in results:
        if 'it_per_s' not in row:
            continue
        print(f"| {row['name']} | {row['batch']} | {row['it_per_s']} | {row['images_per_s']} | {row['peak_mem_gib']} |")
    return results


if __name__ == '__main__':
    main()
