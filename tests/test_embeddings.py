"""Textual-inversion embeddings: A1111 and diffusers files, used by their file name in prompts, as diffusers
uses them; files that cannot fit are refused by name."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from modelscope_sd import StableDiffusionText2ImagePipeline
from modelscope_sd.cli import main

WIDTH = 32  # the tiny text encoder's hidden size (SD1.5: 768)
ARGS = dict(num_inference_steps=2, seed=0)


def _embedding(folder, name='mystyle', vectors=2, width=WIDTH, key='emb_params'):
    """An A1111-style embedding file: {'emb_params': (vectors, width)}, named as the word it adds."""
    path = os.path.join(folder, f'{name}.safetensors')
    save_file({key: torch.randn(vectors, width, generator=torch.Generator().manual_seed(1)) * 2}, path)
    return path


def _pipe(model, **kwargs):
    return StableDiffusionText2ImagePipeline(model, device='cpu', progress_bar=False, **kwargs)


def _image(pipe, prompt, **kwargs):
    return pipe(prompt, **ARGS, **kwargs)['output_imgs'][0].astype(int)


def test_embedding_word_works_as_in_diffusers_and_in_weighted_prompts(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    path = _embedding(str(tmp_path))
    ours = _pipe(tiny_model_dir, textual_inversion=path)
    assert ours.embeddings == ['mystyle']
    plain = _image(ours, 'a photo, mystyle')
    vanilla = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    vanilla.load_textual_inversion(path, token='mystyle')
    expected = vanilla('a photo, mystyle', num_inference_steps=2, output_type='np',
                       generator=[torch.Generator().manual_seed(0)]).images[0]
    assert np.abs(plain - (expected * 255).round().astype(int)[..., ::-1]).max() <= 1
    # the weighted path reads the word as its two vectors too: weight 1 is the plain image
    assert np.abs(_image(ours, 'a photo, (mystyle:1.0)') - plain).max() <= 1
    assert np.abs(_image(ours, 'a photo, (mystyle:1.4)') - plain).max() > 0
    # as a negative embedding, and without the word nothing changes
    base = _pipe(tiny_model_dir)
    assert np.abs(_image(ours, 'a photo', negative_prompt='mystyle') - _image(ours, 'a photo')).max() > 0
    assert np.array_equal(_image(ours, 'a photo'), _image(base, 'a photo'))


def test_embedding_word_in_an_edited_prompt_reads_all_its_vectors(tiny_model_dir, tmp_path):
    ours = _pipe(tiny_model_dir, textual_inversion=_embedding(str(tmp_path)))
    edited = _image(ours, '[a photo:a photo, mystyle:0]')  # the second text from the first call on
    assert np.abs(edited - _image(ours, 'a photo, mystyle')).max() <= 1


def test_an_embedding_that_does_not_fit_a_windows_rest_starts_the_next_window(tiny_model_dir, tmp_path):
    """As A1111 does: a 10-vector word after 70 tokens is not cut 5 + 5 across two windows."""
    from modelscope_sd import prompts
    pipe = _pipe(tiny_model_dir, textual_inversion=_embedding(str(tmp_path), vectors=10)).sd
    head, word = 'x' * 70, pipe.maybe_convert_prompt('mystyle', pipe.tokenizer)  # byte tokens: 70
    assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 10
    torch.testing.assert_close(prompts.encode(pipe, [f'{head} {word}'], None, 2),
                               torch.cat([prompts.encode(pipe, [t], None, 1) for t in (head, word)], dim=1))
    fits = prompts.tokens_with_weights(pipe.tokenizer, f'{"x" * 65} {word}')[0]  # 65 + 10: one window
    assert len(fits) == prompts.CHUNK


def test_diffusers_textual_inversion_output_loads_by_its_word_as_in_diffusers(tiny_model_dir, tmp_path):
    """diffusers' textual_inversion.py writes OUTPUT_DIR/learned_embeds.safetensors, {'<cat-toy>': (1, width)}: its
    word is the one stored, and the folder or the file can be given, as to diffusers' load_textual_inversion."""
    from diffusers import StableDiffusionPipeline
    folder = tmp_path / 'textual_inversion_cat'
    folder.mkdir()
    save_file({'<cat-toy>': torch.randn(1, WIDTH, generator=torch.Generator().manual_seed(2)) * 2},
              str(folder / 'learned_embeds.safetensors'))
    ours = _pipe(tiny_model_dir, textual_inversion=str(folder))
    assert ours.embeddings == ['<cat-toy>']
    vanilla = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    vanilla.load_textual_inversion(str(folder))
    expected = vanilla('a <cat-toy> on a table', num_inference_steps=2, output_type='np',
                       generator=[torch.Generator().manual_seed(0)]).images[0]
    image = _image(ours, 'a <cat-toy> on a table')
    assert np.abs(image - (expected * 255).round().astype(int)[..., ::-1]).max() <= 1
    assert np.abs(image - _image(_pipe(tiny_model_dir), 'a <cat-toy> on a table')).max() > 0
    by_file = _pipe(tiny_model_dir, textual_inversion=str(folder / 'learned_embeds.safetensors'))
    assert by_file.embeddings == ['<cat-toy>']
    assert _pipe(tiny_model_dir, textual_inversion={'cat': str(folder)}).embeddings == ['cat']


def test_a1111_pickle_embedding_needs_allow_pickle(tiny_model_dir, tmp_path):
    path = str(tmp_path / 'oldstyle.pt')
    torch.save({'string_to_param': {'*': torch.randn(3, WIDTH)}, 'name': 'oldstyle', 'step': 1000}, path)
    with pytest.raises(ValueError, match="textual_inversion=.*oldstyle.pt' is a pickle file.*allow_pickle=True"):
        _pipe(tiny_model_dir, textual_inversion=path)
    assert _pipe(tiny_model_dir, textual_inversion=path, allow_pickle=True).embeddings == ['oldstyle']


@pytest.mark.parametrize('make, error, message', [
    (lambda d: _embedding(d, width=1024), ValueError, 'width 1024.*takes 32.*1024 is SD2'),
    (lambda d: _embedding(d, key='clip_l'), ValueError, 'is an SDXL embedding'),
    (lambda d: {'a': _embedding(d)}, ValueError, "'a' is already a word of the tokenizer"),
    (lambda d: os.path.join(d, 'missing.safetensors'), FileNotFoundError, 'missing.safetensors.*no such file'),
    (lambda d: d, FileNotFoundError, "is a folder without learned_embeds.safetensors or learned_embeds.bin .*pass the "
                                     'embedding file'),
    (lambda d: 42, TypeError, 'textual_inversion must be a path, a list of them'),
])
def test_embeddings_that_cannot_fit_are_refused_by_name(tiny_model_dir, tmp_path, make, error, message):
    with pytest.raises(error, match=message):
        _pipe(tiny_model_dir, textual_inversion=make(str(tmp_path)))


def test_generate_records_the_embedding_and_from_png_recreates_the_image(tiny_model_dir, tmp_path):
    path = _embedding(str(tmp_path))
    [first] = main(['generate', '--prompt', 'a photo', '--negative_prompt', 'mystyle', '--textual_inversion', path,
                    '--model', tiny_model_dir, '--num_inference_steps', '2', '--seed', '3', '--device', 'cpu',
                    '--output_dir', str(tmp_path / 'out')])
    assert f'Textual inversion: {path}' in Image.open(first).text['parameters']
    [again] = main(['generate', '--from_png', first, '--device', 'cpu', '--output_dir', str(tmp_path / 'again')])
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
