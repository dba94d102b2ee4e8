"""Aspect-ratio buckets (kohya's ``--enable_bucket``): each image trains at the bucket size nearest its own
shape, about ``resolution``² pixels, instead of as a centre square that cuts off the top and bottom of a
portrait; a batch holds images of one bucket. Batches are a function of (seed, epoch), as ``EpochSampler``'s
order is, so a resumed run sees the same ones."""

import logging
import math
from collections import Counter
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image

logger = logging.getLogger(__name__)

Size = Tuple[int, int]  # (width, height) in pixels
_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that rotate by 90°: the photo is shown height × width


def size_step(unet) -> int:
    """Pixel sizes must be multiples of this: the VAE's 8 times the UNet's downsampling (64 for SD1.5)."""
    return 8 * 2 ** (len(unet.config.block_out_channels) - 1)


def side_bounds(resolution: int, shortest: Optional[int] = None, longest: Optional[int] = None) -> Tuple[int, int]:
    """The shortest and longest bucket side in pixels: ``shortest`` and ``longest`` (kohya's --min/max_bucket_reso),
    by default half and twice ``resolution`` (256 to 1024 at 512, as kohya's defaults)."""
    return shortest or resolution // 2, longest or resolution * 2


def bucket_sizes(resolution: int, step: int, shortest: Optional[int] = None, longest: Optional[int] = None
                 ) -> List[Size]:
    """The largest ``step``-multiple sizes of at most ``resolution``² pixels, sides within `side_bounds`."""
    low, high = side_bounds(resolution, shortest, longest)
    low, high = max(step, low // step * step), high // step * step
    sizes = set()
    for width in range(low, high + 1, step):
        height = min(high, resolution * resolution // width // step * step)
        if height >= low:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def image_size(path: str) -> Size:
    """(width, height) as the image is shown, EXIF rotation included, from its header alone."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(0x0112) in _SWAPPED_ORIENTATIONS:
            width, height = height, width
    return width, height


def assign_buckets(paths: Sequence[str], resolution: int, step: int, shortest: Optional[int] = None,
                   longest: Optional[int] = None) -> List[Size]:
    """Each image's bucket: the size whose aspect ratio is nearest the image's (on a log scale)."""
    sizes = bucket_sizes(resolution, step, shortest, longest)
    targets = []
    for path in paths:
        width, height = image_size(path)
        aspect = math.log(width / height)
        targets.append(min(sizes, key=lambda s: abs(math.log(s[0] / s[1]) - aspect)))
    counts = Counter(targets)
    logger.info('%d aspect-ratio buckets: %s.', len(counts),
                ', '.join(f'{w}x{h}: {n}' for (w, h), n in sorted(counts.items(), key=lambda kv: -kv[1])))
    return targets


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of (epoch, index) keys whose images share a bucket. With ``full`` every batch is: a bucket's last
    batch is topped up with its first images, so that accelerate can deal batches evenly to several processes
    (it fills a short last round with the first batches' samples, which could mix buckets). ``start_epoch``'s
    ``skip`` counts samples (batches × batch size), as ``EpochSampler``'s does."""

    def __init__(self, targets: Sequence[Size], batch_size: int, seed: int, shuffle: bool = True, full: bool = True):
        self.batch_size, self.seed, self.shuffle, self.full = batch_size, seed, shuffle, full
        self.members: Dict[Size, List[int]] = {}
        for index, target in enumerate(targets):
            self.members.setdefault(target, []).append(index)
        self.total = sum(math.ceil(len(m) / batch_size) for m in self.members.values())
        self.epoch, self.skip = 0, 0

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip // self.batch_size

    def __len__(self):
        return self.total - self.skip

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        batches = []
        for target in sorted(self.members):
            members = self.members[target]
            if self.shuffle:
                members = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                while self.full and len(batch) < self.batch_size:  # top up from the bucket's start
                    batch += members[:self.batch_size - len(batch)]
                batches.append(batch)
        order = torch.randperm(len(batches), generator=generator).tolist() if self.shuffle else range(len(batches))
        for position in list(order)[self.skip:]:
            yield [(self.epoch, index) for index in batches[position]]
