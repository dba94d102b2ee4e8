"""Long prompts and A1111 emphasis."""

import numpy as np
import pytest
import torch

from modelscope_sd import lora_tags, prompts

STEPS = dict(num_inference_steps=2, seed=0)


@pytest.mark.parametrize('text, expected', [
    ('a red hat', [('a red hat', 1.0)]),
    ('a (red:1.5) hat', [('a ', 1.0), ('red', 1.5), (' hat', 1.0)]),
    ('(red)', [('red', pytest.approx(1.1))]),
    ('[red]', [('red', pytest.approx(1 / 1.1))]),
    ('((red))', [('red', pytest.approx(1.21))]),
    ('(a (red:2) hat:0.5)', [('a ', 0.5), ('red', 1.0), (' hat', 0.5)]),
    (r'a \(literal\) paren', [('a (literal) paren', 1.0)]),
    ('time 12:30', [('time 12:30', 1.0)]),
])
def test_parse_weights(text, expected):
    assert prompts.parse_weights(text) == expected


def test_lora_tags_leave_the_prompt_as_in_a1111():
    text, tags = lora_tags.parse('a castle, <lora:detail:0.5>, <lyco:Style_v2> sky')
    assert text == 'a castle, ,  sky' and tags == {'detail': 0.5, 'Style_v2': 1.0}
    with pytest.raises(ValueError, match='weight must be a number'):
        lora_tags.parse('<lora:detail:strong>')


def test_unbalanced_brackets_are_literal_with_a_warning(caplog):
    assert prompts.parse_weights('a (red hat') == [('a (red hat', 1.0)]
    assert 'Unbalanced brackets' in caplog.text


def test_one_window_encoding_equals_diffusers(sd_pipe):
    ours = prompts.encode(sd_pipe.sd, ['a red hat'], None, 1)
    theirs = sd_pipe.sd.encode_prompt('a red hat', torch.device('cpu'), 1, False)[0]
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize('prompt', ['a red hat', 'a (red:1.5) hat'])
def test_clip_skip_reads_an_earlier_layer_through_the_final_layer_norm(sd_pipe, vanilla_pipe, prompt):
    """A1111's Clip skip 2 is clip_skip=1: the second-to-last layer's states through CLIP's final layer norm, as
    diffusers computes them (its own clip_skip fails on transformers 5), for plain and weighted prompts alike."""
    text_encoder = vanilla_pipe.text_encoder
    norm = getattr(text_encoder, 'text_model', text_encoder).final_layer_norm

    def skipped(text):
        ids = vanilla_pipe.tokenizer(text, padding='max_length', max_length=77, return_tensors='pt').input_ids
        with torch.no_grad():
            return norm(text_encoder(ids, output_hidden_states=True).hidden_states[-2])

    scaled = skipped('a red hat')
    if '(' in prompt:  # A1111's emphasis on the skipped layer's states
        _, weights = prompts.tokens_with_weights(vanilla_pipe.tokenizer, prompt)
        scaled = scaled.clone()
        scaled[0, [i + 1 for i, w in enumerate(weights) if w != 1.0]] *= 1.5
        scaled *= skipped('a red hat').mean() / scaled.mean()
    expected = vanilla_pipe(prompt_embeds=scaled, negative_prompt_embeds=skipped(''), num_inference_steps=2,
                            generator=[torch.Generator().manual_seed(0)], output_type='np').images[0]
    got = sd_pipe(prompt, clip_skip=1, **STEPS)['output_imgs'][0][..., ::-1].astype(int)
    assert np.abs(got - (expected * 255).round().astype(int)).max() <= 1
    assert np.abs(got - sd_pipe(prompt, **STEPS)['output_imgs'][0][..., ::-1].astype(int)).max() > 2


def test_weights_scale_their_tokens_and_the_window_keeps_its_mean(sd_pipe):
    """A1111's default ("Original") emphasis: each token's embedding times its weight, then the whole window
    rescaled to the mean it had unweighted."""
    plain = prompts.encode(sd_pipe.sd, ['a red hat'], None, 1)
    weighted = prompts.encode(sd_pipe.sd, ['a (red:1.5) hat'], None, 1)
    # byte-level tiny tokenizer: 'a', ' '… are tokens; 'red' is three tokens at positions 3-5 (after BOS, 'a', ' ')
    ids, weights = prompts.tokens_with_weights(sd_pipe.sd.tokenizer, 'a (red:1.5) hat')
    changed = [i + 1 for i, w in enumerate(weights) if w != 1.0]
    assert len(changed) == 3
    scaled = plain.clone()
    scaled[0, changed] *= 1.5
    torch.testing.assert_close(weighted, scaled * plain.mean() / scaled.mean())
    assert abs(plain.mean() / scaled.mean() - 1) > 1e-3  # the rescale is not a no-op on this model


def test_a1111_emphasis_modes(sd_pipe):
    """No norm: weights without the mean restored; Ignore: brackets read, weights left out; None: all words."""
    sd = sd_pipe.sd
    plain = prompts.encode(sd, ['a red hat'], None, 1)
    _, weights = prompts.tokens_with_weights(sd.tokenizer, 'a (red:1.5) hat')
    scaled = plain.clone()
    scaled[0, [i + 1 for i, w in enumerate(weights) if w != 1.0]] *= 1.5
    torch.testing.assert_close(prompts.encode(sd, ['a (red:1.5) hat'], None, 1, 'No norm'), scaled)
    torch.testing.assert_close(prompts.encode(sd, ['a (red:1.5) hat'], None, 1, 'Ignore'), plain)
    literal = sd.encode_prompt('a (red:1.5) hat BREAK sky', torch.device('cpu'), 1, False)[0]
    torch.testing.assert_close(prompts.encode(sd, ['a (red:1.5) hat BREAK sky'], None, 1, 'None'), literal)
    # with None, a short prompt with brackets is a plain prompt: diffusers' own encoding
    assert prompts.text_inputs(sd, 'a (red:1.5) hat', emphasis='None') == {
        'prompt': ['a (red:1.5) hat'], 'negative_prompt': None}
    with pytest.raises(ValueError, match="emphasis='Sharp' is not one of"):
        prompts.emphasis_name('Sharp')


def test_emphasis_mode_changes_a_weighted_image_only(sd_pipe):
    args = dict(num_inference_steps=2, seed=0)
    weighted = {mode: sd_pipe('a (red:1.8) hat', emphasis=mode, **args)['output_imgs'][0].astype(int)
                for mode in ('Original', 'No norm', 'Ignore')}
    assert np.abs(weighted['No norm'] - weighted['Original']).max() > 1
    assert np.abs(weighted['Ignore'] - sd_pipe('a red hat', **args)['output_imgs'][0].astype(int)).max() <= 1
    unweighted = [sd_pipe('a red hat', emphasis=mode, **args)['output_imgs'][0] for mode in ('Original', 'no norm')]
    assert np.array_equal(*unweighted)


@pytest.mark.parametrize('comma_at, moved', [(55, True), (54, False), (74, True)])
def test_a_window_ends_at_a_comma_close_to_its_end(sd_pipe, comma_at, moved):
    """A1111's comma backtracking: when a window fills up within 20 tokens of its last comma, the words after
    that comma start the next window instead of being cut in two."""
    tokenizer = sd_pipe.sd.tokenizer
    words = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    head, tail = 'x' * comma_at, 'y' * 30  # the tiny tokenizer is byte-level: one token per character
    ids, weights = prompts.tokens_with_weights(tokenizer, f'{head}, ({tail}:1.2)')
    if moved:
        fill = prompts.CHUNK - comma_at - 1
        assert ids == words(head + ',') + [tokenizer.eos_token_id] * fill + words(tail)
        assert weights == [1.0] * prompts.CHUNK + [pytest.approx(1.2)] * 30
    else:
        assert ids == words(f'{head},{tail}')
    assert prompts.window_count(tokenizer, [f'{head}, {tail}']) == 2


def test_long_prompt_uses_tokens_past_77(sd_pipe):
    long_prompt = ' '.join(['a watercolor painting of a quiet harbour at dawn'] * 5)  # ~250 byte tokens
    assert len(sd_pipe.sd.tokenizer(long_prompt, add_special_tokens=False).input_ids) >= 200
    first_75 = sd_pipe.sd.tokenizer.decode(sd_pipe.sd.tokenizer(long_prompt, add_special_tokens=False)
                                           .input_ids[:75])
    full = sd_pipe(long_prompt, **STEPS)['output_imgs'][0].astype(int)
    cut = sd_pipe(first_75, **STEPS)['output_imgs'][0].astype(int)
    assert np.abs(full - cut).max() > 0


def test_a_long_prompt_brings_no_warning_of_indexing_errors(tiny_model_dir, caplog):
    """transformers warns, once per tokenizer, that a prompt past 77 tokens "will result in indexing errors"; this
    pipeline reads it in windows (a fresh one: the shared pipeline's tokenizer may have warned already)."""
    import logging
    from modelscope_sd import StableDiffusionText2ImagePipeline
    pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False)
    library = logging.getLogger('transformers')  # has a handler of its own and does not propagate
    library.addHandler(caplog.handler)
    try:
        pipe(' '.join(['a quiet harbour at dawn'] * 10), **STEPS)
    finally:
        library.removeHandler(caplog.handler)
    assert 'indexing errors' not in caplog.text


def test_short_plain_prompt_takes_the_plain_path(sd_pipe, vanilla_pipe):
    ours = sd_pipe('a red hat', **STEPS)['output_imgs'][0].astype(int)
    image = vanilla_pipe('a red hat', num_inference_steps=2, output_type='np',
                         generator=[torch.Generator().manual_seed(0)]).images[0]
    assert np.abs(ours - (image * 255).round().astype(int)[..., ::-1]).max() <= 1


def test_weighted_prompt_changes_the_image_and_negative_lengths_match(sd_pipe):
    plain = sd_pipe('a red hat', **STEPS)['output_imgs'][0].astype(int)
    weighted = sd_pipe({'text': 'a (red:1.8) hat', 'negative_prompt': 'blurry, ' * 60, **STEPS})['output_imgs'][0]
    assert np.abs(weighted.astype(int) - plain).max() > 0


def test_break_starts_a_new_window_as_in_a1111(sd_pipe):
    pipe = sd_pipe.sd
    cat, dog = (prompts.encode(pipe, [text], None, 1) for text in ('a cat', 'a dog'))
    torch.testing.assert_close(prompts.encode(pipe, ['a cat BREAK a dog'], None, 2), torch.cat([cat, dog], dim=1))
    weighted = prompts.encode(pipe, ['(a cat BREAK a dog:1.5)'], None, 2)  # inside a group, the weight carries on
    torch.testing.assert_close(weighted, torch.cat([prompts.encode(pipe, [f'({t}:1.5)'], None, 1)
                                                     for t in ('a cat', 'a dog')], dim=1))
    # a window that is full needs no padding; a trailing BREAK adds no window; lower case is a word
    full = prompts.tokens_with_weights(pipe.tokenizer, 'x' * prompts.CHUNK)[0]
    assert len(full) == prompts.CHUNK
    assert prompts.tokens_with_weights(pipe.tokenizer, 'x' * prompts.CHUNK + ' BREAK a dog')[0] == (
        full + prompts.tokens_with_weights(pipe.tokenizer, 'a dog')[0])
    assert prompts.window_count(pipe.tokenizer, ['a cat BREAK ']) == 1
    assert prompts.tokens_with_weights(pipe.tokenizer, 'a cat break a dog')[0] == pipe.tokenizer(
        'a cat break a dog', add_special_tokens=False).input_ids
    # the pipeline takes this path for a short prompt with BREAK
    torch.testing.assert_close(prompts.text_inputs(pipe, 'a cat BREAK a dog')['prompt_embeds'],
                               torch.cat([cat, dog], dim=1))
