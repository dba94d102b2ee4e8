"""Training data for both trainers: where (image, caption) records come from, how images become tensors,
and a sampler whose order is a function of (seed, epoch) so that a resumed run sees the same batches."""

import csv
import glob
import io
import json
import logging
import os
import random
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from modelscope_sd.files import read_text
from modelscope_sd.images import to_rgb
from modelscope_sd.loading import hub_status, hub_unreachable, is_hub_id, root_cause
from modelscope_sd.prompts import CHUNK, window_count_of, window_ids, window_layout

from .buckets import assign_buckets, size_step
from .diffusion import encode_prompt_ids

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.tif', '.tiff')
CAPTION_EXTENSIONS = ('.txt', '.caption')  # .caption: kohya's default caption extension
KOHYA_FOLDER = re.compile(r'(\d+)_(.*)')  # kohya's dataset subfolders: <repeats>_<class tokens>
CAPTION_COLUMNS = ('Text', 'text', 'caption', 'prompt')
IMAGE_COLUMNS = ('Target:FILE', 'image:FILE', 'Image:FILE', 'file_name', 'image')


@dataclass
class Record:
    image: str
    caption: str


# ---------------------------------------------------------------- where records come from
def load_records(source: str, split: str = 'train', caption: Optional[str] = None) -> List[Record]:
    """A ModelScope dataset id, a local folder in its csv layout, or an image folder with captions;
    ``caption`` (DreamBooth's instance prompt) replaces whatever captions the source has."""
    if os.path.isdir(source):
        csv_path = _split_csv(source, split)
        if not csv_path:
            return records_from_image_folder(source, caption) if split == 'train' else []
        records = _records_from_table(csv_path, os.path.dirname(csv_path))
    elif os.path.exists(source):
        raise ValueError(f'dataset={source!r} is a file: pass a folder or a ModelScope dataset id.')
    elif not is_hub_id(source):
        raise FileNotFoundError(f'dataset={source!r}: no such folder, and not a ModelScope dataset id (owner/name).')
    else:
        records = _records_from_msdataset(source, split)
    return records if caption is None else [Record(r.image, caption) for r in records]


def _split_csv(folder: str, split: str) -> Optional[str]:
    for name in (f'{split}.csv', os.path.join(split, f'{split}.csv'), os.path.join(split, 'metadata.csv')):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _pick_columns(columns: Sequence[str], where: str) -> Tuple[str, str]:
    image = next((c for c in IMAGE_COLUMNS if c in columns), None)
    caption = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if image is None or caption is None:
        raise ValueError(f'{where}: expected an image column (one of {IMAGE_COLUMNS}) and a caption column '
                         f'(one of {CAPTION_COLUMNS}), found {list(columns)}.')
    return image, caption


def _records_from_table(path: str, root: str) -> List[Record]:
    """Rows of a .csv, or of a .jsonl (one JSON object a line), with image paths relative to ``root``."""
    text = read_text(path, 'dataset table')
    rows = (list(csv.DictReader(io.StringIO(text, newline=''))) if path.endswith('.csv')
            else [json.loads(line) for line in text.splitlines() if line.strip()])
    if not rows:
        return []
    image, caption = _pick_columns(list(rows[0]), path)
    return [Record(os.path.join(root, row[image]), row.get(caption) or '') for row in rows]


def _records_from_msdataset(name: str, split: str) -> List[Record]:
    from modelscope.msdatasets import MsDataset
    try:
        dataset = MsDataset.load(name, split=split)
    except ValueError as err:  # unknown split
        if split != 'train' and 'not found' in str(err):
            return []
        raise
    except Exception as err:
        status = hub_status(err)
        if status in (401, 403, 404):  # the hub's answer, the same for a private dataset as for none
            raise FileNotFoundError(
                f"dataset_name={name!r} is not a dataset on ModelScope's hub or not open to you (HTTP "
                f'{status}): check the id (owner/name, as in the dataset page\'s address), run `modelscope '
                'login` for a private one, or train on a local folder (--train_data_dir, or --dataset_name '
                'FOLDER).') from err
        if not hub_unreachable(err):
            raise
        raise ConnectionError(f"dataset={name!r}: ModelScope's hub could not be reached ({root_cause(err)}). Check "
                              'the network connection (or MODELSCOPE_ENDPOINT), or train on a local folder: images '
                              'with .txt captions (--train_data_dir), or a folder in the csv layout '
                              '(--dataset_name FOLDER).') from err
    items = [dict(item) for item in dataset]
    if not items:
        if split != 'train':
            return []
        raise ValueError(f'dataset={name!r} split {split!r} is empty: check the id, or that the hub answered.')
    image, caption = _pick_columns(list(items[0]), f'dataset={name!r}')
    records = [Record(item[image], item[caption] or '') for item in items]
    if any(not isinstance(r.image, str) or not r.image for r in records):
        raise ValueError(f'dataset={name!r}: column {image!r} does not hold file paths.')
    return records


def image_paths(folder: str) -> List[str]:
    return sorted(p for p in glob.glob(os.path.join(folder, '**', '*'), recursive=True)
                  if p.lower().endswith(IMAGE_EXTENSIONS))


def records_from_image_folder(folder: str, caption: Optional[str] = None) -> List[Record]:
    """Images with a same-named .txt (or kohya's .caption) caption, or a metadata.jsonl / metadata.csv as Hugging
    Face's imagefolder has it ({"file_name", "text"}; the caption column may also be caption or prompt); with
    ``caption`` (DreamBooth's instance prompt) every image gets that caption. A folder in kohya's layout
    (subfolders ``<repeats>_<class tokens>``, e.g. ``10_sks dog``) gives each subfolder's images ``repeats``
    times per epoch, captioned by their caption files or else by the class tokens, as kohya's trainers read it."""
    concepts = kohya_concepts(folder)
    if not concepts:
        return _folder_records(folder, caption)
    records = []
    for path, repeats, tokens in concepts:
        found = _folder_records(path, caption, fallback=tokens or None)
        logger.info("kohya's layout: %s: %d image(s) x %d repeats per epoch", os.path.relpath(path, folder),
                    len(found), repeats)
        records += found * repeats
    return records


def kohya_concepts(folder: str) -> List[Tuple[str, int, str]]:
    """(subfolder, repeats, class tokens) of each ``<repeats>_<class tokens>`` subfolder, in name order, when the
    folder is in kohya's layout: every subfolder that holds images is named so, and no image or metadata file
    (whose captions would go unread) lies beside them. Empty otherwise (then all images are read, subfolders
    included)."""
    subfolders = sorted(p for p in glob.glob(os.path.join(folder, '*')) if os.path.isdir(p))
    concepts = [(p, int(m.group(1)), m.group(2).strip()) for p in subfolders
                for m in [KOHYA_FOLDER.fullmatch(os.path.basename(p))] if m]
    named = {path for path, _, _ in concepts}
    loose = [p for p in glob.glob(os.path.join(folder, '*'))
             if p.lower().endswith(IMAGE_EXTENSIONS) or os.path.basename(p) in ('metadata.jsonl', 'metadata.csv')]
    if not concepts or loose or any(image_paths(p) for p in subfolders if p not in named):
        return []
    zero = [os.path.basename(path) for path, repeats, _ in concepts if repeats < 1]
    if zero:
        raise ValueError(f'{zero} in {folder!r}: in kohya\'s layout the number before _ is how often each image '
                         'repeats per epoch, and must be 1 or more.')
    return concepts


def _folder_records(folder: str, caption: Optional[str], fallback: Optional[str] = None) -> List[Record]:
    """The folder's images (subfolders included) with their captions; ``fallback`` for one without."""
    images = image_paths(folder)
    if not images:
        raise ValueError(f'{folder!r} holds no images ({", ".join(IMAGE_EXTENSIONS)}).')
    if caption is not None:
        return [Record(p, caption) for p in images]
    captions = _metadata_captions(folder)
    missing = []
    records = []
    for path in images:
        text = captions.get(os.path.normpath(path))
        for extension in CAPTION_EXTENSIONS:
            caption_file = os.path.splitext(path)[0] + extension
            if text is None and os.path.isfile(caption_file):
                text = read_text(caption_file, 'caption file').strip()
        text = fallback if text is None else text
        if text is None:
            missing.append(os.path.relpath(path, folder))
        records.append(Record(path, text))
    if missing:
        raise ValueError(f'{len(missing)} image(s) in {folder!r} have no caption: {missing[:10]}. Add a .txt (or '
                         '.caption) with the same name beside each image, or a metadata.jsonl or metadata.csv '
                         '(file_name, text).')
    return records


def dataset_summary(records: List[Record], source: str) -> Dict[str, dict]:
    """What kohya's trainers record of a dataset (ss_tag_frequency, ss_dataset_dirs), per folder: each kohya
    subfolder, or the dataset as one. Tags are a caption's comma-separated parts, lower case, each image counted
    once however often it repeats; A1111's LoRA tab and civitai show them as the adapter's training tags."""
    local = os.path.isdir(source)
    subsets = {os.path.normpath(path) + os.sep: os.path.basename(path)
               for path, _, _ in (kohya_concepts(source) if local else [])}
    whole = os.path.basename(os.path.normpath(source))
    repeats = Counter(record.image for record in records)
    tags: Dict[str, Counter] = defaultdict(Counter)
    dirs: Dict[str, Dict[str, int]] = {}
    for image, caption in dict.fromkeys((record.image, record.caption) for record in records):
        subset = next((name for prefix, name in subsets.items() if os.path.normpath(image).startswith(prefix)), whole)
        folder = dirs.setdefault(subset, {'n_repeats': repeats[image], 'img_count': 0})
        folder['img_count'] += 1
        tags[subset].update(tag.strip().lower() for tag in caption.split(',') if tag.strip())
    return {'tag_frequency': {name: dict(counts) for name, counts in tags.items()}, 'dataset_dirs': dirs}


def _metadata_captions(folder: str) -> dict:
    """{image path: caption} from the folder's metadata.jsonl or metadata.csv (empty without one). Its columns
    are picked as in the csv layouts: a file without a caption column is refused, not read as empty captions."""
    for name in ('metadata.jsonl', 'metadata.csv'):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return {os.path.normpath(r.image): r.caption for r in _records_from_table(path, folder)}
    return {}


def _read(path: str) -> Tuple[Optional[str], Optional[Tuple[int, int]]]:
    """(the error that decoding ``path`` gives, or None; its size, or None)."""
    try:
        with Image.open(path) as image:
            image.load()
            return None, image.size
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return f'{path} ({type(err).__name__}: {err})', None


def check_images(records: List[Record], skip_bad: bool, resolution: Optional[int] = None,
                 buckets: bool = False) -> List[Record]:
    """Decode every image once before training: a bad file fails now, listed, not after an hour. Threads
    share the work (decoding releases the GIL): ~9 ms a 1024 px JPEG, 15 minutes for 100k on one core. With
    ``resolution``, images that training would upscale more than 2x, or (square crops, without ``buckets``) see
    less than half of, are named in a warning."""
    paths = list(dict.fromkeys(record.image for record in records))  # each once: kohya's repeats list them again
    with ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool:
        read = dict(zip(paths, pool.map(_read, paths)))
    errors = {path: error for path, (error, _) in read.items()}
    if resolution:
        _warn_of_sizes({path: size for path, (_, size) in read.items() if size}, resolution, buckets)
    good = [record for record in records if errors[record.image] is None]
    bad = [error for error in errors.values() if error is not None]
    if bad and not skip_bad:
        raise ValueError(f'{len(bad)} unreadable image(s): {bad[:10]}. Fix or remove them, or pass '
                         '--skip_bad_images to train without them.')
    if bad:
        logger.warning('Skipping %d unreadable image(s): %s', len(bad), bad[:10])
    if not good:
        raise ValueError('No readable training images left.')
    return good


def _warn_of_sizes(sizes: Dict[str, Tuple[int, int]], resolution: int, buckets: bool) -> None:
    """A square crop is scaled to cover ``resolution`` by its shorter side; a bucket keeps the image's area."""
    def across(width, height):
        return (width * height) ** 0.5 if buckets else min(width, height)

    small = [f'{path} ({w}x{h})' for path, (w, h) in sizes.items() if across(w, h) < resolution / 2]
    if small:
        logger.warning('%d image(s) are less than half of --resolution %d across, so training upscales them more '
                       'than 2x and learns their blur: %s', len(small), resolution, small[:10])
    long = [] if buckets else [f'{path} ({w}x{h})' for path, (w, h) in sizes.items() if max(w, h) > 2 * min(w, h)]
    if long:
        logger.warning('%d image(s) are more than twice as long as they are wide: training crops a square out of '
                       'each and never sees the rest. --enable_bucket trains them whole: %s', len(long), long[:10])


# ---------------------------------------------------------------- images to tensors
def prepare_image(path: str, resolution: Union[int, Tuple[int, int]], center_crop: bool, flip: bool,
                  rng: random.Random) -> torch.Tensor:
    """Resize to cover ``resolution`` (a square side, or an aspect bucket's (width, height)), crop it out,
    optionally flip; [-1, 1] CHW float."""
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    with Image.open(path) as raw:
        image = to_rgb(raw)
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BILINEAR)
    if center_crop:
        left, top = (image.width - width) // 2, (image.height - height) // 2
    else:
        left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
    image = image.crop((left, top, left + width, top + height))
    if flip and rng.random() < 0.5:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def report_long_captions(records: List[Record], tokenizer, max_windows: int) -> None:
    """Say how many captions are cut at ``max_windows`` 75-token CLIP windows (a Chinese character is about 3
    tokens: some 25 characters fit one window)."""
    captions = sorted({r.caption for r in records})
    long = [c for c in captions if window_count_of(window_layout(tokenizer, [(c, 1.0)])[0]) > max_windows]
    limit = max_windows * CHUNK
    if long:
        logger.warning('%d of %d captions are longer than %d tokens and are cut there for training (e.g. %r)%s.',
                       len(long), len(captions), limit, long[0][:80],
                       '; --max_token_length 150 or 225 keeps more' if max_windows < 3 else '')


class CaptionDataset(torch.utils.data.Dataset):
    """Indexed by (epoch, i) from ``EpochSampler``: augmentation is a function of (seed, epoch, i). With
    ``targets`` (aspect buckets, one (width, height) per record) images take their bucket's size, not a square.
    With ``proportion_empty_prompts`` that share of the items, drawn anew each epoch, come with the empty prompt
    instead of their caption (caption dropout), so the model keeps learning the unconditional prediction that
    classifier-free guidance subtracts. A caption's comma-separated tags after the first ``keep_tokens`` can come
    in an order drawn anew each epoch (``shuffle_caption``) and each be left out with probability
    ``caption_tag_dropout_rate``, as kohya's flags of those names do."""

    def __init__(self, records: List[Record], tokenizer, resolution: int, center_crop: bool = False,
                 random_flip: bool = False, seed: int = 0, max_windows: int = 1,
                 targets: Optional[List[Tuple[int, int]]] = None, proportion_empty_prompts: float = 0.0,
                 name: str = '', shuffle_caption: bool = False, keep_tokens: int = 0,
                 caption_tag_dropout_rate: float = 0.0):
        self.records, self.targets, self.proportion_empty_prompts = records, targets, proportion_empty_prompts
        self.shuffle_caption, self.keep_tokens = shuffle_caption, keep_tokens
        self.caption_tag_dropout_rate = caption_tag_dropout_rate
        self.name = name  # datasets trained side by side (instance and class images) draw their dropout apart
        self.tokenizer = tokenizer
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.max_windows = max_windows
        report_long_captions(records, tokenizer, max_windows)
        # what a shorter caption is padded with in a batch: an empty window, as the pipeline pads a short prompt
        self.empty = {'input_ids': torch.tensor(window_ids(tokenizer, '', 1))}

    def __len__(self):
        return len(self.records)

    def tokenize(self, caption: str) -> torch.Tensor:
        return torch.tensor(window_ids(self.tokenizer, caption, self.max_windows))

    def collate(self, examples):
        return collate(examples, self.empty)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return {'pixel_values': self.pixels(index, self._rng(epoch, index), self.random_flip),
                'input_ids': self.empty['input_ids'] if self.drops_caption(epoch, index)
                else self.tokenize(self.caption(epoch, index))}

    @property
    def captions_vary(self) -> bool:
        """Whether a record's caption changes from epoch to epoch (its tags shuffled or dropped)."""
        return self.shuffle_caption or self.caption_tag_dropout_rate > 0

    def caption(self, epoch: int, index: int) -> str:
        """Record ``index``'s caption this epoch. When its tags vary: the tags (stripped, empty ones left out)
        joined by ', ', the first ``keep_tokens`` in place, the rest shuffled and thinned as drawn from (seed,
        epoch, index), apart from the augmentation's and the caption dropout's numbers."""
        caption = self.records[index].caption
        if not self.captions_vary:
            return caption
        tags = [tag.strip() for tag in caption.split(',') if tag.strip()]
        kept, rest = tags[:self.keep_tokens], tags[self.keep_tokens:]
        rng = random.Random(f'{self.seed}-{epoch}-{index}-tags{self.name}')
        if self.shuffle_caption:
            rng.shuffle(rest)
        if self.caption_tag_dropout_rate:
            rest = [tag for tag in rest if rng.random() >= self.caption_tag_dropout_rate]
        return ', '.join(kept + rest)

    def drops_caption(self, epoch: int, index: int) -> bool:
        """Whether item ``index`` trains with the empty prompt this epoch: a function of (seed, epoch, index), drawn
        apart from the augmentation's numbers (which stay those of a run without caption dropout)."""
        return bool(self.proportion_empty_prompts) and \
            random.Random(f'{self.seed}-{epoch}-{index}-caption{self.name}').random() < self.proportion_empty_prompts

    def _rng(self, epoch: int, index: int) -> random.Random:
        return random.Random(f'{self.seed}-{epoch}-{index}')

    def pixels(self, index: int, rng: Optional[random.Random], flip: bool) -> torch.Tensor:
        """Image ``index`` at its size, cropped and (with ``flip``) mirrored half the time, as ``rng`` draws."""
        size = self.resolution if self.targets is None else self.targets[index]
        return prepare_image(self.records[index].image, size, self.center_crop, flip, rng)

    def flipped(self, epoch: int, index: int) -> bool:
        """Whether ``__getitem__`` flips this image this epoch. Only with a centre crop (which draws nothing
        before the flip): a random crop's draws depend on the image."""
        assert self.center_crop, 'flipped() needs center_crop'
        return self.random_flip and self._rng(epoch, index).random() < 0.5


def training_dataset(config, records: List[Record], tokenizer, unet, validation: bool = False,
                     name: str = '') -> CaptionDataset:
    """A trainer's dataset: the config's size, crop, flip, seed, caption windows and (not for ``validation``)
    caption dropout, tag shuffling and tag dropout, and with ``--enable_bucket`` each image's aspect bucket.
    ``name`` tells apart datasets trained side by side."""
    targets = (assign_buckets([r.image for r in records], config.resolution, size_step(unet), config.min_bucket_reso,
                              config.max_bucket_reso) if config.enable_bucket else None)
    return CaptionDataset(records, tokenizer, config.resolution, config.center_crop, config.random_flip,
                          config.seed, config.max_token_length // CHUNK, targets,
                          0.0 if validation else config.proportion_empty_prompts, name,
                          config.shuffle_caption and not validation, config.keep_tokens,
                          0.0 if validation else config.caption_tag_dropout_rate)


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle that depends only on (seed, epoch), yielding (epoch, index) keys; ``skip`` drops the
    first samples of the epoch a run resumes in."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.skip = 0, 0

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        # not `set_epoch`: accelerate calls that on every pass and would reset `skip`
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return self.size - self.skip

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        else:
            order = torch.arange(self.size)
        for index in order[self.skip:].tolist():
            yield (self.epoch, index)


def collate(examples, empty: Optional[dict] = None):
    """Stack each key. Keys in ``empty`` (one empty 77-token window: ids, or their embedding) are padded with it
    to the batch's longest caption first, so captions of different window counts share a batch."""
    batch = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if empty and key in empty:
            longest = max(v.shape[0] for v in values)
            window = empty[key]
            values = [torch.cat([v] + [window.to(v.device, v.dtype)] * ((longest - v.shape[0]) // window.shape[0]))
                      for v in values]
        batch[key] = torch.stack(values)
    return batch


class PriorPreservationDataset(torch.utils.data.Dataset):
    """DreamBooth with prior preservation: every example pairs an instance image with a class image, and a
    batch holds both halves, class samples weighted by ``prior_loss_weight``."""

    def __init__(self, instance: CaptionDataset, class_images: CaptionDataset, prior_loss_weight: float):
        self.instance, self.class_images, self.prior_loss_weight = instance, class_images, prior_loss_weight

    def __len__(self):
        return max(len(self.instance), len(self.class_images))

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return {'instance': self.instance[(epoch, index % len(self.instance))],
                'class': self.class_images[(epoch, index % len(self.class_images))]}

    def collate(self, examples):
        # instance halves first, then class halves; prompts padded to the longest of both
        batch = collate([e['instance'] for e in examples] + [e['class'] for e in examples],
                        getattr(self.instance, 'empty', None))
        n = len(examples)
        batch['loss_weight'] = torch.tensor([1.0] * n + [self.prior_loss_weight] * n)
        batch['is_instance'] = torch.tensor([1.0] * n + [0.0] * n)
        return batch


class CachedDataset(torch.utils.data.Dataset):
    """A ``CaptionDataset`` whose images were encoded once: each item holds the VAE posterior's parameters
    (a fresh latent is still sampled every step) and, with ``text_encoder``, the prompt embedding. With
    ``random_flip`` both orientations are encoded, and each epoch takes the one the dataset's flip would. With
    ``on_device`` they stay where the VAE is, up to ``DEVICE_CACHE_BYTES``, so a step copies nothing from host
    memory (a copy from pageable memory makes the CPU wait for the GPU); a DataLoader with workers needs them
    in host memory. Shuffled or thinned tags change every epoch: such captions are tokenized per item and encoded
    per step."""

    DEVICE_CACHE_BYTES = 1 << 30

    def __init__(self, dataset: CaptionDataset, vae, text_encoder=None, on_device: bool = False,
                 clip_skip: Optional[int] = None):
        self.items = []
        used = 0
        self.empty, self.targets = dict(dataset.empty), dataset.targets
        self.flipped = dataset.flipped if dataset.random_flip else None
        self.drops_caption = dataset.drops_caption
        self.varying = dataset if dataset.captions_vary else None
        text_encoder = None if self.varying else text_encoder
        with torch.no_grad():
            if text_encoder is not None:
                ids = self.empty['input_ids'][None].to(text_encoder.device)
                self.empty['encoder_hidden_states'] = encode_prompt_ids(text_encoder, ids, clip_skip)[0]
            seen = {}  # a record listed again (kohya's repeats) is encoded once, its entry shared
            finite = []  # per encoded image, on the device: read once at the end
            for index in range(len(dataset)):
                record = dataset.records[index]
                key = (record.image, record.caption, None if self.targets is None else self.targets[index])
                if key in seen:
                    self.items.append(self.items[seen[key]])
                    continue
                seen[key] = len(self.items)
                pixels = dataset.pixels(index, None, flip=False)[None].to(vae.device, vae.dtype)
                entry = {'latent_params': vae.encode(pixels).latent_dist.parameters[0]}
                if self.flipped:  # a mirrored crop is the crop mirrored: the same pixels prepare_image flips
                    entry['flipped_latent_params'] = vae.encode(pixels.flip(-1)).latent_dist.parameters[0]
                finite.append((record.image, torch.stack([torch.isfinite(v).all() for v in entry.values()]).all()))
                if not self.varying:  # varying captions are tokenized per item, in __getitem__
                    ids = dataset.tokenize(record.caption)
                    if text_encoder is None:
                        entry['input_ids'] = ids
                    else:
                        ids = ids[None].to(text_encoder.device)
                        entry['encoder_hidden_states'] = encode_prompt_ids(text_encoder, ids, clip_skip)[0]
                self.items.append(entry)
                used += sum(t.numel() * t.element_size() for t in entry.values())
                if on_device and used > self.DEVICE_CACHE_BYTES:  # a batch must not mix devices: all to host
                    logger.info('Cached latents exceed %d MiB: keeping them in host memory.',
                                self.DEVICE_CACHE_BYTES >> 20)
                    on_device = False
                    unique = {id(it): it for it in self.items}.values()
                    host = {id(it): {k: v.cpu() for k, v in it.items()} for it in unique}  # shared stay shared
                    self.items = [host[id(it)] for it in self.items]
                elif not on_device:
                    self.items[-1] = {k: v.cpu() for k, v in entry.items()}
        _check_latents_finite(finite, vae.dtype)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item = dict(self.items[index])
        flipped = item.pop('flipped_latent_params', None)
        if flipped is not None and self.flipped(epoch, index):
            item['latent_params'] = flipped
        if self.varying:
            item['input_ids'] = self.varying.tokenize(self.varying.caption(epoch, index))
        if self.drops_caption(epoch, index):  # the empty prompt's ids, or its cached embedding
            item.update({k: self.empty[k] for k in ('input_ids', 'encoder_hidden_states') if k in item})
        return item

    def collate(self, examples):
        return collate(examples, self.empty)


def _check_latents_finite(finite, dtype: torch.dtype) -> None:
    """Images the VAE encoded to NaN or inf (an overflow in fp16) would make every step that draws them NaN."""
    bad = [image for image, ok in finite if not bool(ok)]
    if bad:
        fix = ('Train with --mixed_precision bf16 (or no), whose VAE has the range fp16 lacks, or leave these images '
               'out.' if dtype == torch.float16 else 'The VAE (its --vae, or the model\'s) may hold NaN: check it.')
        raise ValueError(f'The VAE encoded {len(bad)} image(s) to NaN or inf in {str(dtype).replace("torch.", "")}: '
                         f'{", ".join(map(str, bad[:5]))}{" …" if len(bad) > 5 else ""}. {fix}')


def cache_dataset(dataset, vae, text_encoder=None, on_device: bool = False, clip_skip: Optional[int] = None):
    if isinstance(dataset, PriorPreservationDataset):
        return PriorPreservationDataset(CachedDataset(dataset.instance, vae, text_encoder, on_device, clip_skip),
                                        CachedDataset(dataset.class_images, vae, text_encoder, on_device, clip_skip),
                                        dataset.prior_loss_weight)
    return CachedDataset(dataset, vae, text_encoder, on_device, clip_skip)
