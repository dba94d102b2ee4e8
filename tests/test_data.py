"""Data sources and image conversion."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from finetune.data import EpochSampler, load_records, prepare_image, records_from_image_folder
from modelscope_sd.images import to_rgb
from train_helpers import make_images, make_modelscope_csv_dataset


@pytest.mark.parametrize('mode, array', [
    ('L', np.full((8, 8), 100, np.uint8)),
    ('I;16', np.full((8, 8), 65535, np.uint16)),
    ('RGBA', np.dstack([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)])),
    ('P', None),
])
def test_odd_image_modes_become_rgb(mode, array):
    image = Image.new('P', (8, 8), 3) if mode == 'P' else Image.fromarray(array)
    assert image.mode == mode
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    if mode == 'I;16':
        assert rgb.max() == 255  # 16-bit white stays white
    if mode == 'RGBA':
        assert rgb.min() == 255  # fully transparent over white


def test_prepare_image_resizes_and_crops(tmp_path):
    Image.new('RGB', (60, 40), (255, 0, 0)).save(tmp_path / 'wide.png')
    import random
    tensor = prepare_image(str(tmp_path / 'wide.png'), 16, center_crop=False, flip=True, rng=random.Random(0))
    assert tensor.shape == (3, 16, 16)
    assert float(tensor[0].mean()) == pytest.approx(1.0, abs=1e-3) and float(tensor[1].mean()) == pytest.approx(-1.0)


def test_local_modelscope_csv_layout(tmp_path):
    folder = make_modelscope_csv_dataset(str(tmp_path / 'ds'), train=3, validation=2)
    train, validation = load_records(folder, 'train'), load_records(folder, 'validation')
    assert len(train) == 3 and len(validation) == 2
    assert train[0].caption == 'a train photo 0' and Image.open(train[0].image).size == (40, 40)


def test_metadata_jsonl_captions(tmp_path):
    make_images(str(tmp_path), count=2, captions=False)
    with open(tmp_path / 'metadata.jsonl', 'w') as f:
        for i in range(2):
            f.write(json.dumps({'file_name': f'img{i}.png', 'text': f'caption {i}'}) + '\n')
    assert [r.caption for r in records_from_image_folder(str(tmp_path))] == ['caption 0', 'caption 1']


@pytest.mark.parametrize('name, text', [
    ('metadata.jsonl', '{"file_name": "img0.png", "caption": "a red fox"}\n'),  # another caption column
    ('metadata.csv', 'file_name,text\nimg0.png,"a red fox, in snow"\n'),  # Hugging Face imagefolder's csv
])
def test_imagefolder_metadata_in_other_columns_or_csv(tmp_path, name, text):
    make_images(str(tmp_path), count=1, captions=False)
    (tmp_path / name).write_text(text)
    assert records_from_image_folder(str(tmp_path))[0].caption.startswith('a red fox')


def test_metadata_without_a_caption_column_is_refused_not_read_as_empty_captions(tmp_path):
    make_images(str(tmp_path), count=1, captions=False)
    (tmp_path / 'metadata.jsonl').write_text('{"file_name": "img0.png", "tags": "fox, snow"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl: expected .* caption column .* "
                                         r"found \['file_name', 'tags'\]"):
        records_from_image_folder(str(tmp_path))


def test_captions_saved_with_a_byte_order_mark_read_clean(tmp_path):
    """Windows editors often save UTF-8 with a BOM, which would become the caption's first 'character'."""
    make_images(str(tmp_path / 'txt'), count=1, captions=False)
    (tmp_path / 'txt' / 'img0.txt').write_bytes('\ufeff一只猫\r\n'.encode('utf-8'))
    make_images(str(tmp_path / 'jsonl'), count=1, captions=False)
    (tmp_path / 'jsonl' / 'metadata.jsonl').write_bytes(
        ('\ufeff' + json.dumps({'file_name': 'img0.png', 'text': 'a cat'}) + '\n').encode('utf-8'))
    assert records_from_image_folder(str(tmp_path / 'txt'))[0].caption == '一只猫'
    assert records_from_image_folder(str(tmp_path / 'jsonl'))[0].caption == 'a cat'


def test_utf16_captions_and_tables_are_read_and_other_encodings_named(tmp_path):
    """Notepad's "Unicode" is UTF-16 with a BOM; a GBK caption (Chinese Windows' default) is one error naming the
    file, not a UnicodeDecodeError, nor a guess."""
    make_images(str(tmp_path / 'txt'), count=1, captions=False)
    (tmp_path / 'txt' / 'img0.txt').write_text('一只猫\r\n', encoding='utf-16')
    make_images(str(tmp_path / 'csv'), count=1, captions=False)
    (tmp_path / 'csv' / 'metadata.csv').write_text('file_name,text\r\nimg0.png,"a cat,\nsitting"\r\n',
                                                   encoding='utf-16')
    make_images(str(tmp_path / 'gbk'), count=1, captions=False)
    (tmp_path / 'gbk' / 'img0.txt').write_bytes('一只橘色的猫坐在窗台上'.encode('gbk'))
    assert records_from_image_folder(str(tmp_path / 'txt'))[0].caption == '一只猫'
    assert records_from_image_folder(str(tmp_path / 'csv'))[0].caption == 'a cat,\nsitting'
    with pytest.raises(ValueError, match=r"caption file '.*img0.txt' is not UTF-8 text .*save it as UTF-8"):
        records_from_image_folder(str(tmp_path / 'gbk'))


def test_hub_dataset_items_map_to_records(monkeypatch):
    """MsDataset items for buptwq/lora-stable-diffusion-finetune: {'Text', 'Target:FILE'} dicts."""
    from modelscope.msdatasets import MsDataset
    items = [{'Text': 'a dog', 'Target:FILE': '/cache/extracted/train/1.png'}]
    monkeypatch.setattr(MsDataset, 'load', staticmethod(lambda name, split=None, **kw: items))
    records = load_records('buptwq/lora-stable-diffusion-finetune', 'train')
    assert records[0].caption == 'a dog' and records[0].image == '/cache/extracted/train/1.png'


def test_empty_hub_dataset_is_an_error(monkeypatch):
    from modelscope.msdatasets import MsDataset
    monkeypatch.setattr(MsDataset, 'load', staticmethod(lambda name, split=None, **kw: []))
    with pytest.raises(ValueError, match='is empty'):
        load_records('someone/garbled', 'train')


def test_a_path_is_never_taken_for_a_hub_dataset(monkeypatch, tmp_path):
    from modelscope.msdatasets import MsDataset
    monkeypatch.setattr(MsDataset, 'load', staticmethod(lambda *args, **kwargs: pytest.fail('the hub was asked')))
    for path in (str(tmp_path / 'images'), '/no-such-folder', './data'):  # one '/' each but the first
        with pytest.raises(FileNotFoundError, match=f"dataset={path!r}: no such folder, and not a ModelScope dataset"):
            load_records(path, 'train')


def test_an_unreachable_hub_dataset_names_the_network_and_local_folders(monkeypatch):
    from modelscope.msdatasets import MsDataset

    def load(name, split=None, **kwargs):
        try:
            raise ConnectionRefusedError(111, 'Connection refused')
        except ConnectionRefusedError as err:
            raise RuntimeError('the hub client gave up after its retries') from err

    monkeypatch.setattr(MsDataset, 'load', staticmethod(load))
    with pytest.raises(ConnectionError, match=r"dataset='someone/photos': ModelScope's hub could not be reached "
                                              r"\(ConnectionRefusedError: \[Errno 111\] Connection refused\).*"
                                              r'--train_data_dir'):
        load_records('someone/photos', 'train')
    # the trainers' command lines say it in one line
    from finetune.config import LoraTrainConfig
    from finetune.flags import run_trainer
    with pytest.raises(SystemExit) as exit_info:
        run_trainer(lambda config, notes: load_records(config.dataset_name, 'train'), LoraTrainConfig,
                    ['--dataset_name', 'someone/photos'], 'doc', 'train_lora.py')
    assert exit_info.value.code == 2


def test_a_dataset_the_hub_does_not_have_is_one_error_naming_the_flag(fake_hub):
    with pytest.raises(FileNotFoundError, match=r"dataset_name='nobody/no-data' is not a dataset on ModelScope's hub "
                                                r'or not open to you \(HTTP 404\).*--train_data_dir'):
        load_records('nobody/no-data', 'train')


def test_images_training_would_upscale_more_than_twice_are_named(tmp_path, caplog):
    from finetune.data import Record, check_images
    big, small = make_images(str(tmp_path / 'big'), count=1, size=40) + make_images(str(tmp_path / 'small'), count=1,
                                                                                    size=15)
    records = [Record(big, 'a'), Record(small, 'b')]
    with caplog.at_level('WARNING', logger='finetune.data'):
        assert check_images(records, skip_bad=False, resolution=32) == records
    assert '1 image(s) are less than half of --resolution 32 across' in caplog.text and 'img0.png (15x15)' in caplog.text
    assert big not in caplog.text
    caplog.clear()
    check_images(records, skip_bad=False, resolution=30)  # 15 px is half of 30: upscaled 2x, not more
    assert 'upscales' not in caplog.text


def test_a_long_image_is_named_for_the_crop_that_loses_most_of_it_unless_buckets_keep_it_whole(tmp_path, caplog):
    from finetune.data import Record, check_images
    records = []
    for name, size in (('square.png', (40, 40)), ('wide.png', (100, 12)), ('tall.png', (30, 61))):
        Image.new('RGB', size).save(tmp_path / name)
        records.append(Record(str(tmp_path / name), 'a'))
    with caplog.at_level('WARNING', logger='finetune.data'):
        check_images(records, skip_bad=False, resolution=32)
    assert "2 image(s) are more than twice as long as they are wide" in caplog.text and '--enable_bucket' in caplog.text
    assert 'wide.png (100x12)' in caplog.text and 'tall.png (30x61)' in caplog.text and 'square.png' not in caplog.text
    # a square crop scales the 12 px side to 32: more than 2x, though the image's area is that of a 35 px square
    assert '1 image(s) are less than half of --resolution 32 across' in caplog.text
    caplog.clear()
    with caplog.at_level('WARNING', logger='finetune.data'):
        check_images(records, skip_bad=False, resolution=32, buckets=True)
    assert caplog.text == ''


def test_sampler_order_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(10, seed=1)
    sampler.start_epoch(3)
    full = list(sampler)
    sampler.start_epoch(3, skip=4)
    assert list(sampler) == full[4:]
    sampler.start_epoch(4)
    assert [i for _, i in sampler] != [i for _, i in full]


def test_caption_dropout_is_drawn_per_epoch_and_leaves_the_augmentation_as_it_was(sd_pipe, tmp_path):
    import torch

    from finetune.data import CaptionDataset, CachedDataset
    make_images(str(tmp_path), count=8)
    records = records_from_image_folder(str(tmp_path))
    tokenizer = sd_pipe.sd.tokenizer

    def dataset(proportion):
        return CaptionDataset(records, tokenizer, 32, center_crop=True, random_flip=True, seed=3,
                              proportion_empty_prompts=proportion)

    plain, dropping = dataset(0.0), dataset(0.5)
    keys = [(epoch, i) for epoch in range(4) for i in range(8)]
    dropped = [key for key in keys if torch.equal(dropping[key]['input_ids'], dropping.empty['input_ids'])]
    assert 8 <= len(dropped) <= 24  # about half of 32, a new draw each epoch
    assert {i for e, i in dropped if e == 0} != {i for e, i in dropped if e == 1}
    assert dropped == [key for key in keys if dataset(0.5).drops_caption(*key)]  # seeded: a resume draws the same
    for key in keys:
        assert torch.equal(dropping[key]['pixel_values'], plain[key]['pixel_values'])  # crops and flips unchanged
        if key not in dropped:
            assert torch.equal(dropping[key]['input_ids'], plain[key]['input_ids'])
    # cached: the same items get the empty prompt's embedding
    sd = sd_pipe.sd
    cached = CachedDataset(dropping, sd.vae, sd.text_encoder)
    empty = cached.empty['encoder_hidden_states']
    assert [key for key in keys if torch.equal(cached[key]['encoder_hidden_states'], empty)] == dropped
    # DreamBooth's class images, trained beside the instance images, draw apart from them
    classes = CaptionDataset(records, tokenizer, 32, center_crop=True, seed=3, proportion_empty_prompts=0.5,
                             name='class')
    assert [key for key in keys if classes.drops_caption(*key)] != dropped


def test_shuffled_tags_keep_the_first_ones_and_are_drawn_per_epoch_and_item(sd_pipe, tmp_path):
    """kohya's --shuffle_caption --keep_tokens: the same tags, the first ones in front, a new order each epoch that
    a resumed run draws again; cached latents keep it, with the prompt tokenized per item."""
    import torch

    from finetune.data import CachedDataset, CaptionDataset, Record
    make_images(str(tmp_path), count=2)
    tags = ['sks', 'red hair', 'smile', 'outdoors', 'blue sky', 'looking at viewer', 'upper body', 'tree']
    images = records_from_image_folder(str(tmp_path))
    records = [Record(images[0].image, ', '.join(tags) + ', '), Record(images[1].image, 'a photo')]
    tokenizer = sd_pipe.sd.tokenizer

    def dataset(**kwargs):
        return CaptionDataset(records, tokenizer, 32, center_crop=True, random_flip=True, seed=3, **kwargs)

    shuffling = dataset(shuffle_caption=True, keep_tokens=1)
    captions = [shuffling.caption(epoch, 0) for epoch in range(6)]
    for caption in captions:
        assert caption.split(', ')[0] == 'sks' and sorted(caption.split(', ')) == sorted(tags)
    assert len(set(captions)) >= 4  # 7! orders: a new draw each epoch
    assert [dataset(shuffle_caption=True, keep_tokens=1).caption(e, 0) for e in range(6)] == captions  # seeded
    assert shuffling.caption(0, 1) == 'a photo' and dataset().caption(0, 0) == records[0].caption
    plain = dataset()
    for key in [(epoch, i) for epoch in range(3) for i in range(2)]:
        assert torch.equal(shuffling[key]['input_ids'], plain.tokenize(shuffling.caption(*key)))
        assert torch.equal(shuffling[key]['pixel_values'], plain[key]['pixel_values'])  # crops and flips unchanged
    # cached latents: the prompt is not cached (it changes), so the text encoder gets each epoch's order
    sd = sd_pipe.sd
    cached = CachedDataset(shuffling, sd.vae, sd.text_encoder)
    assert 'encoder_hidden_states' not in cached[(0, 0)]
    assert [cached[(epoch, 0)]['input_ids'].tolist() for epoch in range(3)] == \
        [shuffling[(epoch, 0)]['input_ids'].tolist() for epoch in range(3)]


def test_tag_dropout_leaves_tags_out_per_epoch_but_never_the_kept_ones(sd_pipe, tmp_path):
    """kohya's --caption_tag_dropout_rate: about that share of the tags after --keep_tokens is left out, a new draw
    each epoch, in the caption's order unless shuffled too."""
    from finetune.data import CaptionDataset, Record
    tags = [f'tag{i}' for i in range(40)]
    records = [Record('unused.png', ', '.join(['sks'] + tags))]
    thinning = CaptionDataset(records, sd_pipe.sd.tokenizer, 32, seed=1, keep_tokens=1, caption_tag_dropout_rate=0.25)
    captions = [thinning.caption(epoch, 0).split(', ') for epoch in range(8)]
    left = [len(caption) - 1 for caption in captions]
    assert all(caption[0] == 'sks' for caption in captions) and 20 <= sum(left) / len(left) <= 40
    assert all(caption[1:] == [t for t in tags if t in caption] for caption in captions)  # order kept
    assert len({tuple(caption) for caption in captions}) == 8 and min(left) < 40


def test_keep_tokens_needs_tags_that_change_and_rates_are_checked():
    from finetune.config import LoraTrainConfig
    with pytest.raises(ValueError, match='pass one of those too'):
        LoraTrainConfig(keep_tokens=1)
    with pytest.raises(ValueError, match='keep_tokens=-1 must be >= 0'):
        LoraTrainConfig(keep_tokens=-1, shuffle_caption=True)
    with pytest.raises(ValueError, match=r'caption_tag_dropout_rate=1.0 must be in \[0, 1\)'):
        LoraTrainConfig(caption_tag_dropout_rate=1.0)
    LoraTrainConfig(keep_tokens=1, caption_tag_dropout_rate=0.1)


def test_kohya_caption_files_are_read_where_there_is_no_txt(tmp_path):
    make_images(str(tmp_path), count=2, captions=False)
    (tmp_path / 'img0.caption').write_text('sks, from a .caption file\n')
    (tmp_path / 'img1.txt').write_text('from the .txt')
    (tmp_path / 'img1.caption').write_text('not read: the .txt is there')
    assert [r.caption for r in records_from_image_folder(str(tmp_path))] == ['sks, from a .caption file',
                                                                             'from the .txt']


def test_kohyas_repeats_folders_repeat_their_images_and_caption_by_class_tokens(tmp_path, monkeypatch):
    """kohya's layout: <repeats>_<class tokens> subfolders; an image without a caption file takes the class tokens.
    Each image is still checked once."""
    import finetune.data as data
    make_images(str(tmp_path / 'kohya' / '3_sks dog'), count=2, captions=False)
    (tmp_path / 'kohya' / '3_sks dog' / 'img1.txt').write_text('sks dog, on grass')
    make_images(str(tmp_path / 'kohya' / '1_style' / 'more'), count=1, prefix='style')  # nested: read too
    (tmp_path / 'kohya' / 'logs').mkdir()  # a subfolder without images is no reason to read the layout otherwise
    records = records_from_image_folder(str(tmp_path / 'kohya'))
    names = [(os.path.basename(r.image), r.caption) for r in records]
    assert names == [('style0.png', 'a photo of thing number 0')] + [('img0.png', 'sks dog'),
                                                                    ('img1.png', 'sks dog, on grass')] * 3
    # what kohya's metadata records (ss_tag_frequency, ss_dataset_dirs): each image once, per subfolder
    assert data.dataset_summary(records, str(tmp_path / 'kohya')) == {
        'tag_frequency': {'1_style': {'a photo of thing number 0': 1}, '3_sks dog': {'sks dog': 2, 'on grass': 1}},
        'dataset_dirs': {'1_style': {'n_repeats': 1, 'img_count': 1}, '3_sks dog': {'n_repeats': 3, 'img_count': 2}}}
    opened = []
    monkeypatch.setattr(data, '_read', lambda path: opened.append(path) or (None, (40, 40)))
    assert len(data.check_images(records, skip_bad=False)) == 7 and len(opened) == 3
    # not kohya's layout: an image beside the folders, or a folder of images with another name; all read once
    make_images(str(tmp_path / 'years' / '2023_summer'), count=2)
    make_images(str(tmp_path / 'years'), count=1, prefix='loose')
    assert len(records_from_image_folder(str(tmp_path / 'years'))) == 3
    make_images(str(tmp_path / 'mixed' / '2023_summer'), count=2)
    make_images(str(tmp_path / 'mixed' / 'winter'), count=1)
    assert len(records_from_image_folder(str(tmp_path / 'mixed'))) == 3
    make_images(str(tmp_path / 'described' / '2_things'), count=2, captions=False)  # captions in metadata.jsonl
    (tmp_path / 'described' / 'metadata.jsonl').write_text(''.join(
        json.dumps({'file_name': f'2_things/img{i}.png', 'text': f'thing {i}'}) + '\n' for i in range(2)))
    assert [r.caption for r in records_from_image_folder(str(tmp_path / 'described'))] == ['thing 0', 'thing 1']
    make_images(str(tmp_path / 'zero' / '0_x'), count=1)
    with pytest.raises(ValueError, match=re.escape("['0_x'] in") + ".*must be 1 or more"):
        records_from_image_folder(str(tmp_path / 'zero'))


def test_cached_repeats_are_encoded_once_and_shared(sd_pipe, tmp_path):
    from finetune.data import CachedDataset, CaptionDataset
    make_images(str(tmp_path / '4_thing'), count=2)
    records = records_from_image_folder(str(tmp_path))
    cached = CachedDataset(CaptionDataset(records, sd_pipe.sd.tokenizer, 32, center_crop=True, seed=3),
                           sd_pipe.sd.vae, sd_pipe.sd.text_encoder)
    assert len(cached) == 8 and len({id(item) for item in cached.items}) == 2
    assert cached.items[0] is cached.items[2] and cached.items[1] is cached.items[3]


def test_captions_past_clips_window_are_reported_or_get_more_windows(tmp_path, caplog):
    import torch

    from finetune.data import CaptionDataset, Record
    from tiny_sd import tiny_tokenizer
    tokenizer = tiny_tokenizer(str(tmp_path))
    short, long = 'a photo of a dog', '飞流直下三千尺,疑是银河落九天' * 2  # 3 tokens a character here too: 90
    with caplog.at_level('WARNING', logger='finetune.data'):
        CaptionDataset([Record('x.png', short)] * 3, tokenizer, 32)
        assert not caplog.records
        one = CaptionDataset([Record('x.png', short), Record('y.png', long)], tokenizer, 32)
    assert '1 of 2 captions are longer than 75 tokens' in caplog.text and '飞流直下' in caplog.text
    # one window: exactly the ids diffusers' example feeds CLIP (BOS, 75 tokens at most, EOS, padding)
    for caption in (short, long):
        expected = tokenizer(caption, max_length=77, padding='max_length', truncation=True).input_ids
        assert one.tokenize(caption).tolist() == expected
    # --max_token_length 225: each caption gets the windows it needs (1 and 2 here), as the pipeline gives a prompt;
    # in a batch the shorter one is padded with an empty window, as the pipeline pads the shorter of two prompts
    three = CaptionDataset([Record('x.png', short), Record('y.png', long)], tokenizer, 32, max_windows=3)
    assert three.tokenize(short).shape == torch.Size([77]) and three.tokenize(long).shape == torch.Size([154])
    batch = three.collate([{'input_ids': three.tokenize(short)}, {'input_ids': three.tokenize(long)}])
    empty = tokenizer('', max_length=77, padding='max_length').input_ids
    assert batch['input_ids'].shape == (2, 154) and batch['input_ids'][0, 77:].tolist() == empty


def test_long_caption_training_encoding_is_the_pipelines(sd_pipe):
    """Training reads a long caption as the pipeline reads a long prompt: 75-token windows side by side, a window
    that fills up just past a comma ending at the comma, and BREAK starting a new window."""
    import torch

    from finetune.diffusion import encode_prompt_ids
    from modelscope_sd import prompts
    sd = sd_pipe.sd
    for caption, windows in [('a watercolor painting of a red fox in a snowy forest at dawn ' * 4, 2),  # cut to 2
                             ('x' * 60 + ', ' + 'y' * 30 + ' BREAK a fox', 3)]:  # byte tokens: the comma is 61st
        ids = torch.tensor([prompts.window_ids(sd.tokenizer, caption, windows)])
        with torch.no_grad():
            training = encode_prompt_ids(sd.text_encoder, ids)
        assert training.shape == (1, 77 * windows, sd.text_encoder.config.hidden_size)
        assert torch.allclose(training, prompts.encode(sd, [caption], None, windows), atol=1e-6)


def test_clip_skip_training_encoding_is_the_pipelines_one_layer_less(sd_pipe):
    """--clip_skip 2 (A1111's and kohya's count) reads the second-to-last layer through the final layer norm, as the
    pipeline's clip_skip=1 does; 1 is the last layer, as without."""
    import torch

    from finetune.diffusion import encode_prompt_ids
    from modelscope_sd import prompts
    sd = sd_pipe.sd
    ids = sd.tokenizer(['a red fox in the snow'], padding='max_length', max_length=77, return_tensors='pt').input_ids
    with torch.no_grad():
        skipped, last, plain = (encode_prompt_ids(sd.text_encoder, ids, skip) for skip in (2, 1, None))
        expected = prompts.encode(sd, ['a red fox in the snow'], 1, 1)
    torch.testing.assert_close(skipped, expected)
    torch.testing.assert_close(last, plain)
    assert (skipped - plain).abs().max() > 0.1


# ---------------------------------------------------------------- aspect-ratio buckets
def test_bucket_sizes_are_steps_of_about_resolution_squared_pixels():
    from finetune.buckets import bucket_sizes
    sizes = bucket_sizes(512, 64)
    assert (512, 512) in sizes and (768, 320) in sizes and (320, 768) in sizes and (1024, 256) in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and 256 <= min(w, h) <= max(w, h) <= 1024
               for w, h in sizes)
    assert all((h, w) in sizes for w, h in sizes)


def test_kohyas_min_and_max_bucket_reso_bound_the_sides():
    from finetune.buckets import bucket_sizes
    sizes = bucket_sizes(512, 64, 384, 640)
    assert min(min(s) for s in sizes) == 384 and max(max(s) for s in sizes) == 640
    assert (640, 384) in sizes and (768, 320) not in sizes and (512, 512) in sizes


def test_a_trainers_buckets_keep_within_its_min_and_max_bucket_reso(tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from transformers import CLIPTokenizer

    from finetune.config import LoraTrainConfig
    from finetune.data import training_dataset
    Image.new('RGB', (80, 30)).save(tmp_path / 'wide.png')
    (tmp_path / 'wide.txt').write_text('a wide photo')
    records = records_from_image_folder(str(tmp_path))
    unet = SimpleNamespace(config=SimpleNamespace(block_out_channels=[32, 64]))  # sides in steps of 16

    def targets(**bounds):
        config = LoraTrainConfig(train_data_dir=str(tmp_path), resolution=32, enable_bucket=True, **bounds)
        return training_dataset(config, records, tokenizer, unet).targets
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder='tokenizer')
    assert targets() == [(48, 16)]
    assert targets(min_bucket_reso=32, max_bucket_reso=48) == [(32, 32)]  # no side under 32 fits 32² pixels


def test_images_go_to_the_bucket_of_their_shape_exif_rotation_included(tmp_path):
    from finetune.buckets import assign_buckets
    Image.new('RGB', (80, 30)).save(tmp_path / 'landscape.png')
    Image.new('RGB', (30, 80)).save(tmp_path / 'portrait.png')
    Image.new('RGB', (50, 50)).save(tmp_path / 'square.png')
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated by 90°: a portrait
    Image.new('RGB', (80, 30)).save(tmp_path / 'rotated.jpg', exif=exif)
    paths = [str(tmp_path / n) for n in ('landscape.png', 'portrait.png', 'square.png', 'rotated.jpg')]
    assert assign_buckets(paths, 32, 16) == [(48, 16), (16, 48), (32, 32), (16, 48)]
    tensor = prepare_image(paths[0], (48, 16), center_crop=True, flip=False, rng=None)
    assert tensor.shape == (3, 16, 48)


def test_bucket_batches_are_one_bucket_each_full_seeded_and_skippable():
    from finetune.buckets import BucketBatchSampler
    targets = [(48, 16)] * 5 + [(16, 48)] * 2 + [(32, 32)]
    sampler = BucketBatchSampler(targets, batch_size=2, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5  # 3 + 1 + 1
    assert all(len(b) == 2 and len({targets[i] for _, i in b}) == 1 for b in batches)
    assert {i for b in batches for _, i in b} == set(range(8))  # short batches topped up from their own bucket
    assert list(sampler) == batches
    sampler.start_epoch(1)
    assert list(sampler) != batches and all(epoch == 1 for b in sampler for epoch, _ in b)
    epoch_one = list(sampler)
    sampler.start_epoch(1, skip=4)  # two batches of two done before a resume
    assert list(sampler) == epoch_one[2:] and len(sampler) == 3
    unshuffled = BucketBatchSampler(targets, batch_size=2, seed=3, shuffle=False, full=False)
    assert sorted(len(b) for b in unshuffled) == [1, 1, 2, 2, 2]  # validation: every image once


def test_accelerate_deals_bucket_batches_to_processes_without_mixing_buckets():
    from accelerate.data_loader import BatchSamplerShard

    from finetune.buckets import BucketBatchSampler
    targets = [(48, 16)] * 5 + [(16, 48)] * 2 + [(32, 32)]
    sampler = BucketBatchSampler(targets, batch_size=2, seed=3)
    shards = [list(BatchSamplerShard(sampler, 2, rank, split_batches=False, even_batches=True)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 3  # 5 batches, the last round filled
    assert all(len(b) == 2 and len({targets[i] for _, i in b}) == 1 for shard in shards for b in shard)
