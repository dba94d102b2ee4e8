"""A1111's prompt editing ([from:to:when], [a|b]): its schedules, and images whose embeddings change at the UNet
call A1111's step counter changes them, in diffusers' loop and the fast loop (the hires fix: test_hires)."""

import contextlib

import numpy as np
import pytest
import torch

from modelscope_sd import prompt_editing, prompts
from modelscope_sd.schedulers import make_scheduler

ARGS = dict(num_inference_steps=4, scheduler='euler', seed=5)  # Euler: one UNet call per step


@pytest.mark.parametrize('text, expected', [  # A1111's prompt_parser doctests, 10 steps
    ('test', [(10, 'test')]),
    ('a [b:3]', [(3, 'a '), (10, 'a b')]),
    ('a [b: 3]', [(3, 'a '), (10, 'a b')]),
    ('a [[[b]]:2]', [(2, 'a '), (10, 'a [[b]]')]),
    ('[(a:2):3]', [(3, ''), (10, '(a:2)')]),
    ('a [b : c : 1] d', [(1, 'a b  d'), (10, 'a  c  d')]),
    ('a[b:[c:d:2]:1]e', [(1, 'abe'), (2, 'ace'), (10, 'ade')]),
    ('a [unbalanced', [(10, 'a [unbalanced')]),
    ('a [b:.5] c', [(5, 'a  c'), (10, 'a b c')]),
    ('((a][:b:c [d:3]', [(3, '((a][:b:c '), (10, '((a][:b:c d')]),
    ('[a|(b:1.1)]', [(s, 'a' if s % 2 else '(b:1.1)') for s in range(1, 11)]),
    ('[fe|]male', [(s, 'female' if s % 2 else 'male') for s in range(1, 11)]),
    ('[fe|||]male', [(s, 'female' if s % 4 == 1 else 'male') for s in range(1, 11)]),
    ('[cat:dog:0]', [(10, 'dog')]),
    ('a | [b:3]', [(10, 'a | [b:3]')]),  # a '|' outside brackets: A1111's grammar takes none of it
    ('time 12:30 [red]', [(10, 'time 12:30 [red]')]),
])
def test_schedules_are_a1111s(text, expected):
    assert prompt_editing.schedule(text, 10) == expected


@pytest.mark.parametrize('text, expected', [  # A1111's doctests for a 10-step hires pass after 10 steps
    ('a [b:.5] c', [(10, 'a b c')]), ('a [b:1.5] c', [(5, 'a  c'), (10, 'a b c')]),
    ('a [b:13] c', [(3, 'a  c'), (10, 'a b c')])])
def test_hires_pass_counts_on_from_the_first_pass(text, expected):
    assert prompt_editing.schedule(text, 10, first_pass_steps=10) == expected


def test_each_call_takes_its_text_as_a1111s_step_counter_does():
    """A1111's counter starts at 0 and a text ends after its step: [a:b:2] reads a for calls 0-2."""
    assert [prompt_editing.text_at(prompt_editing.schedule('[a:b:2]', 4), c) for c in range(4)] == list('aaab')
    assert [prompt_editing.text_at(prompt_editing.schedule('[a|b]', 4), c) for c in range(4)] == list('aaba')


@pytest.mark.parametrize('text, edit', [
    ('a [cat:dog:0.5]', '[cat:dog:0.5]'), ('a [cat|dog]', '[cat|dog]'), ('[dog:10]', '[dog:10]'),
    ('[cat:(dog:1.2):0.5]', '[cat:(dog:1.2):0.5]'),
    ('[(red:1.2)] hat', None), (r'a \[note: x\]', None), ('time 12:30 [red]', None)])
def test_edits_are_told_from_emphasis(text, edit):
    assert prompt_editing.first_edit(text) == edit


def _expected_embeds(vanilla_pipe, texts_per_call, per_prompt=1):
    """Each UNet call's encoder_hidden_states, encoded by diffusers itself: [(prompts, negative prompts)] per call."""
    out = []
    for prompts_, negatives in texts_per_call:
        positive, uncond = vanilla_pipe.encode_prompt(list(prompts_), torch.device('cpu'), per_prompt, True,
                                                      list(negatives))
        out.append(torch.cat([uncond, positive]))
    return out


@contextlib.contextmanager
def _unet_inputs(pipe, record):
    """Records the encoder_hidden_states of each UNet call of diffusers' loop."""
    hook = pipe.sd.unet.register_forward_pre_hook(
        lambda module, args, kwargs: record.append(kwargs['encoder_hidden_states'].clone()), with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()


def _reference(vanilla_pipe, embeds, seed):
    """diffusers' loop with each call's embeddings set by a step-end callback written here."""
    base = vanilla_pipe.scheduler
    vanilla_pipe.scheduler = make_scheduler('euler', base.config)
    try:
        negative, positive = embeds[0].chunk(2)
        return vanilla_pipe(
            prompt_embeds=positive, negative_prompt_embeds=negative, num_inference_steps=len(embeds),
            generator=[torch.Generator('cpu').manual_seed(seed)], output_type='np',
            callback_on_step_end=lambda pipe, i, t, kw: {'prompt_embeds': embeds[i + 1]} if i + 1 < len(embeds) else {},
            callback_on_step_end_tensor_inputs=['prompt_embeds']).images[0]
    finally:
        vanilla_pipe.scheduler = base


def _check_calls(got, expected):
    assert len(got) == len(expected)
    for call, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, msg=lambda m: f'UNet call {call}: {m}')


def test_edited_prompt_and_negative_prompt_switch_at_a1111s_calls(sd_pipe, vanilla_pipe):
    with _unet_inputs(sd_pipe, got := []):
        image = sd_pipe('[a red house:a blue car:1]', negative_prompt='[blurry:dark forest:2]', **ARGS)
    texts = [('a red house', 'blurry')] * 2 + [('a blue car', 'blurry'), ('a blue car', 'dark forest')]
    expected = _expected_embeds(vanilla_pipe, [([p], [n]) for p, n in texts])
    _check_calls(got, expected)
    reference = (_reference(vanilla_pipe, expected, 5) * 255).round().astype(int)[..., ::-1]
    assert np.abs(image['output_imgs'][0].astype(int) - reference).max() <= 1


def test_alternation_changes_every_call(sd_pipe, vanilla_pipe):
    with _unet_inputs(sd_pipe, got := []):
        sd_pipe('a [red|blue] house', **ARGS)
    texts = ['a red house', 'a red house', 'a blue house', 'a red house']
    _check_calls(got, _expected_embeds(vanilla_pipe, [([t], ['']) for t in texts]))


def test_a_callers_step_end_callback_runs_beside_the_switch(sd_pipe, vanilla_pipe):
    steps = []
    with _unet_inputs(sd_pipe, got := []):
        sd_pipe('[a red house:a blue car:1]', callback_on_step_end=lambda pipe, i, t, kw: steps.append(i) or {}, **ARGS)
    assert steps == [0, 1, 2, 3]
    texts = ['a red house'] * 2 + ['a blue car'] * 2
    _check_calls(got, _expected_embeds(vanilla_pipe, [([t], ['']) for t in texts]))


def test_an_edit_at_call_0_is_the_second_text_throughout(sd_pipe):
    got = sd_pipe('[a red house:a blue car:0]', **ARGS)['output_imgs'][0].astype(int)
    assert np.abs(got - sd_pipe('a blue car', **ARGS)['output_imgs'][0].astype(int)).max() <= 1


def test_batches_keep_each_prompts_own_schedule(sd_pipe, vanilla_pipe):
    """Edited and plain prompts in one batch, two images each: each image is its prompt made alone."""
    with _unet_inputs(sd_pipe, got := []):
        out = sd_pipe(['[a red house:a blue car:1]', 'a green tree'], num_images_per_prompt=2, **ARGS)['output_imgs']
    texts = [(['a red house', 'a green tree'], ['', ''])] * 2 + [(['a blue car', 'a green tree'], ['', ''])] * 2
    _check_calls(got, _expected_embeds(vanilla_pipe, texts, per_prompt=2))
    alone = sd_pipe('[a red house:a blue car:1]', **dict(ARGS, seed=6))['output_imgs'][0]
    tree = sd_pipe('a green tree', **dict(ARGS, seed=8))['output_imgs'][0]
    assert np.abs(out[1].astype(int) - alone.astype(int)).max() <= 1
    assert np.abs(out[3].astype(int) - tree.astype(int)).max() <= 1


@pytest.mark.parametrize('mask', [False, True])
def test_image_to_image_and_inpainting_count_the_calls_they_run(sd_pipe, vanilla_pipe, mask):
    """strength 0.5 of 8 steps runs 4 UNet calls: [a:b:0.5] switches after call 2 of them."""
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    extra = {'mask_image': np.full((32, 32), 255, dtype=np.uint8)} if mask else {}
    with _unet_inputs(sd_pipe, got := []):
        sd_pipe('[a red house:a blue car:0.5]', image=image, strength=0.5, **dict(ARGS, num_inference_steps=8),
                **extra)
    texts = ['a red house'] * 3 + ['a blue car']
    _check_calls(got, _expected_embeds(vanilla_pipe, [([t], ['']) for t in texts]))


def test_steps_count_unet_calls(sd_pipe):
    variant = sd_pipe._variant('img2img')
    variant.scheduler = make_scheduler('euler', sd_pipe.base_scheduler.config)
    assert prompts.model_calls(variant, 8, strength=0.5) == 4
    sd_pipe.sd.scheduler = make_scheduler('pndm', sd_pipe.base_scheduler.config)
    assert prompts.model_calls(sd_pipe.sd, 50) == 51  # PNDM's first step calls the UNet twice


def _step_inputs(denoiser, monkeypatch, record):
    """Records the embeddings each step of the whole-step loop gets."""
    step = denoiser.step

    def recording_step(unet, x0, history, coefs, scale, timestep, embeds, *rest):
        record.append(embeds.clone())
        return step(unet, x0, history, coefs, scale, timestep, embeds, *rest)

    monkeypatch.setattr(denoiser, 'step', recording_step)


@pytest.mark.parametrize('scheduler', ['euler_a', 'pndm', 'heun'])
def test_fast_loop_switches_at_the_same_calls(sd_pipe, fast_pipe, monkeypatch, scheduler):
    args = dict(ARGS, scheduler=scheduler, num_images_per_prompt=2)
    texts = ['[a red house:a blue car:0.5]', 'a [red|blue] house']
    _step_inputs(fast_pipe.denoiser, monkeypatch, fast_calls := [])
    a = fast_pipe(texts, negative_prompt='[blurry::2]', **args)['output_imgs']
    with _unet_inputs(sd_pipe, plain_calls := []):
        b = sd_pipe(texts, negative_prompt='[blurry::2]', **args)['output_imgs']
    _check_calls(fast_calls, plain_calls)
    assert sum(not torch.equal(x, y) for x, y in zip(plain_calls, plain_calls[1:])) >= 2  # the texts did change
    assert max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(a, b)) <= 1


def test_fast_loop_reads_the_hires_schedule_as_the_plain_path(sd_pipe, fast_pipe, monkeypatch):
    args = dict(ARGS, scheduler='euler_a', hr_scale=1.5, hr_second_pass_steps=8, strength=0.5)
    _step_inputs(fast_pipe.denoiser, monkeypatch, fast_calls := [])
    a = fast_pipe('[a red house:a blue car:1.5]', **args)['output_imgs'][0].astype(int)
    with _unet_inputs(sd_pipe, plain_calls := []):
        b = sd_pipe('[a red house:a blue car:1.5]', **args)['output_imgs'][0].astype(int)
    _check_calls(fast_calls, plain_calls)  # 4 first-pass calls of a, then 4 of the second: a, a, a, b
    assert len(plain_calls) == 8 and sum(not torch.equal(x, y) for x, y in zip(plain_calls, plain_calls[1:])) == 1
    assert not torch.equal(plain_calls[6], plain_calls[7])
    assert np.abs(a - b).max() <= 1



@pytest.mark.parametrize('text, expected', [  # A1111's re_AND and re_weight
    ('a cat AND a dog:0.5', [('a cat', 1.0), (' a dog', 0.5)]),
    ('a cat :1.2 AND a (dog:1.3)', [('a cat', 1.2), (' a (dog:1.3)', 1.0)]),
    ('a cat, at 12:30', None), ('a cat and a dog', None)])
def test_and_splits_as_a1111(text, expected):
    assert prompt_editing.split_and(text) == expected


def _and_reference(vanilla_pipe, subprompts, seed):
    """diffusers' loop over a UNet written here: for [negative; prompt] rows it returns [negative; negative +
    Σ weight × (subprompt − negative)], each subprompt encoded by diffusers (A1111's combine_denoised)."""
    embeds = [vanilla_pipe.encode_prompt(text, torch.device('cpu'), 1, False)[0] for text, _ in subprompts]
    unet, original = vanilla_pipe.unet, vanilla_pipe.unet.forward

    def forward(sample, t, encoder_hidden_states, **kwargs):
        latents, negative = sample.chunk(2)[0], encoder_hidden_states.chunk(2)[0]
        uncond = original(latents, t, encoder_hidden_states=negative, **kwargs)[0]
        parts = [original(latents, t, encoder_hidden_states=e, **kwargs)[0] for e in embeds]
        return (torch.cat([uncond, uncond + sum(w * (p - uncond) for p, (_, w) in zip(parts, subprompts))]),)

    unet.forward = forward
    try:
        return (_reference(vanilla_pipe, _expected_embeds(vanilla_pipe, [(['x'], [''])] * 4), seed) * 255).round()
    finally:
        del unet.forward


def test_and_sums_the_subprompts_guidance_as_a1111(sd_pipe, vanilla_pipe):
    got = sd_pipe('a red house AND a blue car:0.6', **ARGS)['output_imgs'][0].astype(int)
    expected = _and_reference(vanilla_pipe, [('a red house', 1.0), (' a blue car', 0.6)], 5).astype(int)[..., ::-1]
    assert np.abs(got - expected).max() <= 1
    house = sd_pipe('a red house', **ARGS)['output_imgs'][0].astype(int)
    assert np.abs(got - house).max() > 10
    # weights that add up to one prompt's: its image
    halves = sd_pipe('a red house:0.5 AND a red house:0.5', **ARGS)['output_imgs'][0].astype(int)
    assert np.abs(halves - house).max() <= 1


def test_and_in_a_batch_keeps_each_images_prompt_and_seed(sd_pipe):
    texts = ['a red house AND [a blue car:a tree:1]:0.6', 'a green tree']
    out = sd_pipe(texts, num_images_per_prompt=2, negative_prompt=['blurry', 'dark'], **ARGS)['output_imgs']
    first = sd_pipe(texts[0], negative_prompt='blurry', **dict(ARGS, seed=6))['output_imgs'][0]
    tree = sd_pipe(texts[1], negative_prompt='dark', **dict(ARGS, seed=8))['output_imgs'][0]
    assert np.abs(out[1].astype(int) - first.astype(int)).max() <= 1
    assert np.abs(out[3].astype(int) - tree.astype(int)).max() <= 1
    hires = sd_pipe(texts[0], hr_scale=1.5, **ARGS)['output_imgs'][0]
    assert hires.shape == (48, 48, 3)


def test_and_in_image_to_image_keeps_each_images_seed(sd_pipe):
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    args = dict(ARGS, image=image, strength=0.6, num_inference_steps=6, num_images_per_prompt=2)
    halves = sd_pipe(['a cat:0.5 AND a cat:0.5', 'a dog AND a tree'], **args)['output_imgs']
    cat = sd_pipe('a cat', **dict(args, num_images_per_prompt=1, seed=6))['output_imgs'][0]
    assert np.abs(halves[1].astype(int) - cat.astype(int)).max() <= 1
    assert halves[3].shape == (32, 32, 3)


def test_and_in_diffusers_loop_inpaints_calls_back_and_takes_any_scheduler(sd_pipe, monkeypatch):
    """Where the table loop does not run a call (inpainting, a step-end callback, a scheduler that is not linear),
    diffusers' loop runs it with the UNet's calls composed: the table loop's images, edits included."""
    import modelscope_sd.composable as composable
    from diffusers import DDIMScheduler
    composed = []
    real = composable.ComposedCalls
    monkeypatch.setattr(composable, 'ComposedCalls', lambda *a: composed.append(1) or real(*a))
    steps = []

    def callback(pipe, i, t, kwargs):
        steps.append(i)
        return {}

    from diffusers import UNet2DConditionModel
    real_forward, seen = UNet2DConditionModel.forward, []

    def spy(self, sample, timestep, encoder_hidden_states, *args, **kwargs):  # both loops call the class's forward
        seen.append(encoder_hidden_states.clone())
        return real_forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, 'forward', spy)
    for text in ('a red house AND a blue car:0.6', '[a red house:a green dragon:0.5] AND a blue car:0.6'):
        seen.clear()
        table = sd_pipe(text, **ARGS)['output_imgs'][0].astype(int)
        table_calls = seen[:]
        seen.clear()
        assert not composed
        called = sd_pipe(text, callback_on_step_end=callback, **ARGS)['output_imgs'][0].astype(int)
        assert composed.pop() and steps == [0, 1, 2, 3] and np.abs(called - table).max() <= 1
        assert len(seen) == len(table_calls) == 4 and all(torch.equal(a, b) for a, b in zip(seen, table_calls))
        steps.clear()
    assert not torch.equal(seen[2], seen[3])  # the edit did change the composed calls' embeddings
    monkeypatch.setattr(UNet2DConditionModel, 'forward', real_forward)
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    clipping = DDIMScheduler.from_config(sd_pipe.sd.scheduler.config, clip_sample=True)  # not linear
    for task in (dict(image=image, mask_image=mask), dict(scheduler=clipping)):
        halves = sd_pipe('a cat:0.5 AND a cat:0.5', **{**ARGS, **task})['output_imgs'][0].astype(int)
        assert composed.pop()
        cat = sd_pipe('a cat', **{**ARGS, **task})['output_imgs'][0].astype(int)
        dog = sd_pipe('a cat AND a dog', **{**ARGS, **task})['output_imgs'][0].astype(int)
        assert np.abs(halves - cat).max() <= 1 and np.abs(dog - cat).max() > 2


def test_and_with_dpm_sde_draws_each_images_brownian_noise_from_its_seed(sd_pipe):
    """AND runs the table loop, which draws DPM++ SDE's tree noise up front; the plain prompts run diffusers'."""
    args = dict(ARGS, scheduler='dpm++_sde_karras')
    halves = sd_pipe(['a cat:0.5 AND a cat:0.5', 'a dog:0.5 AND a dog:0.5'], **args)['output_imgs']
    cat = sd_pipe('a cat', **args)['output_imgs'][0]
    dog = sd_pipe('a dog', **dict(args, seed=args['seed'] + 1))['output_imgs'][0]
    assert np.abs(halves[0].astype(int) - cat.astype(int)).max() <= 1
    assert np.abs(halves[1].astype(int) - dog.astype(int)).max() <= 1
