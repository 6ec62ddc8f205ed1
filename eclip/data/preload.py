"""Training data preloaded to the device: every image decoded once, every batch made and augmented there.

:class:`PreloadedProducts` decodes the training products' images once into one uint8 tensor on the training
device, ``(N_images, 3, S, S)`` at the model's image size, and tokenizes every text once. A batch is then an
index into those tensors plus an augmentation done on the device, so that no DataLoader, PIL decode or
host-to-device copy runs per step (``TrainConfig.preload``; docs/gpu-recipe.md).

What is the same as :class:`eclip.data.dataset.ProductDataset` + :class:`eclip.data.dataset.Collate`:

* the products (:func:`eclip.data.dataset.usable_products`), their texts and tokens, their ``product_ids``;
* the image pair of each product: :func:`eclip.data.dataset.choose_pair` on the product's readable images
  with ``random.Random(f"{seed}:{epoch}:{product_id}")``, as ``ProductDataset.__getitem__`` draws it for
  ``dataset.epoch = epoch``;
* the distribution of the augmentation: ``RandomResizedCrop(S, scale=(0.5, 1), ratio=(3/4, 4/3))`` (its
  ten tries and its fallback), a horizontal flip with probability 1/2, normalization with ``MEAN``/``STD``.

What differs, on purpose:

* the crop and flip are drawn on the device, per epoch, for every product at once, from a generator seeded
  by ``(seed, epoch)``: the same distribution as torchvision's draws, not the same numbers (the PIL path
  seeds torch's generator per sample with the sample's ``random.Random``);
* the crop is resampled from the decoded ``S x S`` uint8 image by bilinear interpolation in float32
  (``F.grid_sample``), with sample positions clamped to the crop as PIL resamples a cropped image. When the
  source images are ``S x S`` (the catalogue generated at the model's size) the geometry is PIL's: the result
  differs from the PIL path's by its rounding to uint8 (about 1 level in 255, see the tests). A source of
  another size is first resized to ``S x S`` (PIL bilinear, as evaluation does), and the crop is then
  upsampled from that, where the PIL path resamples the source crop directly;
* a product none of whose images can be read is left out once, when the data is loaded (the PIL path drops
  it from each batch it falls in, so those batches are smaller);
* the epoch is the real one: each epoch draws new pairs and crops.

Images are stored as uint8 (3 S^2 bytes each: 20k products x 3 images at 112 px are 2.3 GB) and converted
to float32 per batch.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
import random

import numpy as np
import torch
from torch.nn import functional as F

from .dataset import MEAN, STD, _open, choose_pair, usable_products
from .manifest import Product

SCALE = (0.5, 1.0)
RATIO = (3 / 4, 4 / 3)
TRIES = 10  # RandomResizedCrop's attempts before its central-crop fallback


def draw_crops(count: int, height: int, width: int, generator: torch.Generator, *, scale=SCALE,
               ratio=RATIO) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` draws of ``RandomResizedCrop.get_params`` and a horizontal flip each, on ``generator``'s device.

    Returns ``(boxes, flips)``: boxes (count, 4) int64 ``(top, left, height, width)`` in pixels of a
    ``height x width`` image, flips (count,) bool. Each draw follows torchvision's algorithm: up to 10 tries of an
    area share uniform in ``scale`` and a log-aspect uniform in ``log(ratio)``, sides rounded half to even, the
    first try that fits wins, its position uniform among the integer positions that keep it inside; if none
    fits, the largest central crop with the aspect clamped to ``ratio``.
    """
    device = generator.device
    area = height * width
    u_area = torch.rand(count, TRIES, generator=generator, device=device).double()
    u_ratio = torch.rand(count, TRIES, generator=generator, device=device).double()
    u_pos = torch.rand(count, 2, generator=generator, device=device).double()
    flips = torch.rand(count, generator=generator, device=device) < 0.5
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(dim=1)
    # the fallback: torchvision's central crop
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, fw)
    h = torch.where(found, h, fh)
    # torch.randint(0, n) in distribution: floor(u * n), u in [0, 1)
    top = torch.where(found, (u_pos[:, 0] * (height - h + 1)).floor().long(), (height - fh) // 2)
    left = torch.where(found, (u_pos[:, 1] * (width - w + 1)).floor().long(), (width - fw) // 2)
    return torch.stack([top, left, h, w], dim=1), flips


def resized_crop_flip(pixels: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int,
                      mean=MEAN, std=STD) -> torch.Tensor:
    """Crop, resize, flip and normalize a batch on its device.

    Args:
        pixels: (B, 3, H, W) uint8 images.
        boxes: (B, 4) int ``(top, left, height, width)`` crops inside the images.
        flips: (B,) bool, flip the result horizontally.
        size: side of the square output.

    Returns:
        (B, 3, size, size) float32, ``(x / 255 - mean) / std``.

    Numerics: bilinear interpolation in float32 at the centres of the output pixels mapped into the crop
    (PIL's convention: output pixel u samples the crop at ``(u + 0.5) * crop / size - 0.5`` in its pixel index),
    the positions clamped to the crop, so that only pixels of the crop contribute, as when PIL resizes the
    cropped image. The flip mirrors the output (the crop's columns in reverse order).
    """
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (B, 3, H, W) uint8, got {tuple(pixels.shape)} {pixels.dtype}")
    if boxes.shape != (pixels.shape[0], 4) or flips.shape != (pixels.shape[0],):
        raise ValueError(f"boxes must be (B, 4) and flips (B,) for B = {pixels.shape[0]}, got "
                         f"{tuple(boxes.shape)} and {tuple(flips.shape)}")
    batch, _, height, width = pixels.shape
    device = pixels.device
    top, left, h, w = (boxes[:, i, None].to(device, torch.float32) for i in range(4))
    steps = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size  # (size,)
    ys = torch.minimum(torch.maximum(top + steps * h - 0.5, top), top + h - 1)  # (B, size) pixel index
    xs = torch.minimum(torch.maximum(left + steps * w - 0.5, left), left + w - 1)
    xs = torch.where(flips.to(device)[:, None], xs.flip(1), xs)
    # pixel index -> grid_sample's normalized coordinate (align_corners=False)
    gx = (2 * xs + 1) / width - 1
    gy = (2 * ys + 1) / height - 1
    grid = torch.stack([gx[:, None, :].expand(batch, size, size), gy[:, :, None].expand(batch, size, size)], dim=-1)
    out = F.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean_t = torch.tensor(mean, device=device, dtype=torch.float32)[:, None, None] * 255
    std_t = torch.tensor(std, device=device, dtype=torch.float32)[:, None, None] * 255
    return (out - mean_t) / std_t


def _decode(path: str, size: int) -> np.ndarray | None:
    """(size, size, 3) uint8, or None when unreadable; resized with PIL bilinear when it is not size x size
    (as evaluation's ``Resize``)."""
    from PIL import Image

    image = _open(path)
    if image is None:
        return None
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


class PreloadedProducts:
    """The training products with their images on ``device`` (see the module docstring).

    Args:
        products: as for :class:`eclip.data.dataset.ProductDataset` (the train part of the split).
        image_size: side S of the stored images and of the augmented ones.
        tokenizer: the model's :class:`eclip.models.TextTokenizer` (texts are tokenized once).
        device: where the images, tokens and batches live.
        seed: of the pair choice and of the augmentation.
        product_index: product_id -> int id used as ``product_ids`` (default: order in ``products``).
        threads: threads that decode the images (default: up to 8).

    ``len()`` is the number of products kept; ``report`` counts what was left out or handled when loading
    (``empty_text``, ``no_images``, ``no_readable_image`` products; ``unreadable_image`` images).
    """

    def __init__(self, products: list[Product], image_size: int, *, tokenizer, device, seed: int = 0,
                 product_index: dict[str, int] | None = None, threads: int | None = None):
        self.image_size, self.seed, self.device = image_size, seed, torch.device(device)
        usable, report = usable_products(products)
        index = product_index or {p.product_id: i for i, p in enumerate(products)}
        paths = [image.path for product in usable for image in product.images]
        threads = threads or min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            decoded = list(pool.map(lambda path: _decode(path, image_size), paths))
        kept, arrays, first, count, sources, unreadable = [], [], [], [], [], []
        flat = 0
        for product in usable:
            mine = decoded[flat:flat + len(product.images)]
            flat += len(product.images)
            readable = [i for i, array in enumerate(mine) if array is not None]
            report["unreadable_image"] += len(mine) - len(readable)
            if not readable:
                report["no_readable_image"] += 1
                continue
            kept.append(product)
            first.append(len(arrays))
            count.append(len(readable))
            arrays.extend(mine[i] for i in readable)
            sources.append([product.images[i].source for i in readable])
            unreadable.append(len(mine) - len(readable))
        self.products, self.report = kept, collections.Counter(+report)
        self.sources = sources
        self.first = torch.tensor(first, dtype=torch.long)
        self.unreadable = unreadable
        pixels = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, image_size, image_size, 3,
                                                                                dtype=torch.uint8)
        self.pixels = pixels.to(self.device).permute(0, 3, 1, 2).contiguous()  # the copy to channels-first there
        input_ids, attention_mask = tokenizer([p.text for p in kept]) if kept else (None, None)
        self.input_ids = input_ids.to(self.device) if kept else None
        self.attention_mask = attention_mask.to(self.device) if kept else None
        self.product_ids = torch.tensor([index[p.product_id] for p in kept], dtype=torch.long, device=self.device)

    def __len__(self) -> int:
        return len(self.products)

    @property
    def nbytes(self) -> int:
        return self.pixels.numel() * self.pixels.element_size()

    def describe(self) -> str:
        """The one line the trainer prints when it starts."""
        size = self.image_size
        left = f"; left out or passed over: {dict(self.report)}" if self.report else ""
        return (f"data preloaded to {self.device}: {self.pixels.shape[0]:,} images of {len(self):,} products, "
                f"{self.nbytes / 2**20:,.0f} MB (uint8, {size} x {size}); random resized crop and flip drawn and "
                f"applied on the device, bilinear from the {size}-px images (docs/gpu-recipe.md){left}")

    def pairs(self, epoch: int, rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchor, positive) image indices into ``pixels`` (on the device) of the products ``rows`` (default:
        all) in ``epoch``: :func:`eclip.data.dataset.choose_pair` with ``ProductDataset``'s generator."""
        rows = range(len(self)) if rows is None else rows
        anchors, positives = [], []
        for row in rows:
            rng = random.Random(f"{self.seed}:{epoch}:{self.products[row].product_id}")
            anchor, positive = choose_pair(self.sources[row], rng)
            anchors.append(anchor)
            positives.append(positive)
        first = self.first[list(rows)]
        return ((first + torch.tensor(anchors, dtype=torch.long)).to(self.device),
                (first + torch.tensor(positives, dtype=torch.long)).to(self.device))

    def epoch_plan(self, epoch: int) -> dict[str, torch.Tensor]:
        """Everything random of one epoch, per product and on the device: the image pair and, for the anchor
        and the positive image, the crop box and the flip. Depends only on (seed, epoch): the same on every
        rank and whatever the batch size, so a resumed run draws what the uninterrupted one drew."""
        anchor, positive = self.pairs(epoch)
        generator = torch.Generator(device=self.device)
        generator.manual_seed((self.seed * 1_000_003 + epoch * 7919 + 0x5EED) % (2**63))
        boxes, flips = draw_crops(2 * len(self), self.image_size, self.image_size, generator)
        return {"anchor": anchor, "positive": positive, "boxes": boxes.view(len(self), 2, 4),
                "flips": flips.view(len(self), 2)}

    def batch(self, rows: list[int], plan: dict[str, torch.Tensor]) -> dict:
        """The batch of the products ``rows`` (positions in this dataset) with an epoch's ``plan``: the keys of
        :class:`eclip.data.dataset.Collate`'s batches, tensors on the device."""
        index = torch.tensor(rows, dtype=torch.long).to(self.device)
        size = self.image_size
        images = resized_crop_flip(self.pixels[plan["anchor"][index]], plan["boxes"][index, 0],
                                   plan["flips"][index, 0], size)
        positive_images = resized_crop_flip(self.pixels[plan["positive"][index]], plan["boxes"][index, 1],
                                            plan["flips"][index, 1], size)
        skipped = collections.Counter(unreadable_image=sum(self.unreadable[r] for r in rows))
        skipped["single_image"] += sum(len(self.sources[r]) == 1 for r in rows)
        return {"skipped": dict(+skipped), "size": len(rows), "images": images, "positive_images": positive_images,
                "input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "product_ids": self.product_ids[index],
                "product_keys": [self.products[r].product_id for r in rows]}
