"""Input pipeline on the accelerator: JPEG decoding and the training augmentation, batched on the device.

At thousands of images per second, decoding and bicubic resizing in DataLoader workers can cost more
CPU than a node has. With ``--gpu_augment`` the workers only gather encoded bytes
(:class:`RawBytesCollator`), and :class:`GpuAugment` does the rest on the device:

1. Decode: all JPEGs of the batch in one ``torchvision.io.decode_jpeg(list, device=...)`` call (nvJPEG
   on CUDA). Other formats, and 4-channel (CMYK / YCCK) JPEGs, go through PIL on the CPU with the same
   colour conversion as the CPU path; undecodable data is skipped and counted.
2. RandomResizedCrop: crop boxes are drawn on the CPU with torchvision's algorithm (area 0.2-1 of the
   image, aspect ratio 3/4-4/3, ten tries, then a centre fallback). Each crop is a view of its image and
   is resized with bilinear interpolation plus antialiasing (``F.interpolate(antialias=True)``; in float
   on CUDA, in uint8 on the CPU where that kernel is much faster), one call per image: decoded images
   differ in size, so no single batched op (``grid_sample`` or ``roi_align``) applies without padding
   every image to the largest, which costs far more memory and time. The CPU path uses PIL's bicubic;
   the two differ slightly in sharpness, not in geometry.
3. Flip and normalise for the whole batch at once (one fused multiply-add).

Without CUDA the same code runs on the CPU (``decode_jpeg`` on the CPU), which is how it is tested.

Reproducible views: for training examples that carry their key (as the trainer gives them),
:class:`RawBytesCollator` passes each image's view seed, and :class:`GpuAugment` draws that image's crop and
flip from a generator seeded with it: a function of (seed, epoch, example) alone, as on the CPU path
(other crops than the CPU path's, from the same distribution), so a run resumed mid-epoch gets the same
views. Each unreadable example is counted once, as on the CPU path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from ..validation import POSITIVE, POSITIVE_INT, Bound, check_value
from .decoding import MAX_IMAGE_PIXELS, decode_image
from .streaming import UnreadableTally
from .transforms import (
    EXAMPLE_KEY,
    IMAGENET_MEAN,
    IMAGENET_STD,
    UNREADABLE_IDS,
    example_id,
    view_seed,
)

_JPEG_MAGIC = b"\xff\xd8\xff"
# Start-of-frame markers (baseline, extended, progressive, lossless and their arithmetic variants).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def read_image_bytes(value: Any) -> bytes | None:
    """Encoded bytes of an image value as ``datasets`` gives it with ``Image(decode=False)``.

    Accepts ``{"bytes", "path"}`` dicts, raw bytes and paths; None when the data is missing or the file
    cannot be read (the caller skips and counts it).
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return bytes(data)
        return read_image_bytes(path) if path else None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value) or None
    if isinstance(value, str) or hasattr(value, "__fspath__"):
        try:
            with open(value, "rb") as handle:
                return handle.read() or None
        except OSError:
            return None
    raise TypeError(
        f"Cannot read image bytes from a {type(value).__name__}; keep the image column encoded "
        "(datasets.Image(decode=False), as load_split does)"
    )


class RawBytesCollator:
    """Gathers the encoded images of a batch into one flat uint8 tensor; the workers decode nothing.

    Returns ``{"image_data": uint8 [total bytes], "image_lengths": long [B'], "labels": long [B']
    (with a label column), "skipped_images": long scalar}``. One flat tensor instead of B small ones keeps
    the transfer from worker processes to a single shared-memory block. Unreadable values (missing
    bytes or files) are skipped and counted here; undecodable bytes are counted by :class:`GpuAugment`.

    When the examples carry their key (``EXAMPLE_KEY``), the batch also holds, as plain lists that stay on
    the CPU, the ``view_seeds`` and ``example_ids`` of its B' images and the identities of its unreadable
    examples (``unreadable_ids``), as :class:`~attndistill_hf.data.ImageCollator` gives them.
    """

    # The trainer attaches an ExampleKey to the training examples of a collator that reads them.
    uses_example_keys = True

    def __init__(self, image_column: str = "image", label_column: str | None = None) -> None:
        self.image_column = image_column
        self.label_column = label_column

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        chunks: list[bytes] = []
        labels: list[int] = []
        seeds: list[int] = []
        identities: list[int] = []
        unreadable: list[int] = []
        for example in examples:
            if self.image_column not in example:
                raise KeyError(f"Example has no image column {self.image_column!r}; its columns are {sorted(example)}")
            key = example.get(EXAMPLE_KEY)
            identity = None if key is None else example_id(key, example, self.image_column)
            data = read_image_bytes(example[self.image_column])
            if data is None:
                if identity is not None:
                    unreadable.append(identity)
                continue
            chunks.append(data)
            if identity is not None:
                identities.append(identity)
                seeds.append(view_seed(key, identity))
            if self.label_column is not None:
                if self.label_column not in example:
                    raise KeyError(
                        f"Example has no label column {self.label_column!r}; its columns are {sorted(example)}"
                    )
                labels.append(int(example[self.label_column]))
        flat = np.frombuffer(b"".join(chunks), dtype=np.uint8) if chunks else np.zeros(0, dtype=np.uint8)
        batch: dict[str, Any] = {
            "image_data": torch.from_numpy(flat.copy()),
            "image_lengths": torch.tensor([len(c) for c in chunks], dtype=torch.long),
        }
        if self.label_column is not None:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        batch["skipped_images"] = torch.tensor(len(examples) - len(chunks), dtype=torch.long)
        if any(EXAMPLE_KEY in example for example in examples):
            batch |= {"view_seeds": seeds, "example_ids": identities, UNREADABLE_IDS: unreadable}
        return batch


class JpegFrame(NamedTuple):
    """What a JPEG's frame header declares: its size and colour components (1 gray, 3 YCbCr, 4 CMYK/YCCK)."""

    height: int
    width: int
    components: int


def jpeg_frame(data: np.ndarray | bytes) -> JpegFrame | None:
    """The frame header of a JPEG, None if not found; walks the marker segments without decoding anything."""
    view = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    if view[:2] != b"\xff\xd8":
        return None
    pos, size = 2, len(view)
    while pos + 4 <= size:
        if view[pos] != 0xFF:
            return None
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = (view[pos + 2] << 8) | view[pos + 3]
        if marker in _SOF_MARKERS:
            if pos + 9 >= size:
                return None
            # Segment: length (2), precision (1), height (2), width (2), components (1).
            height, width = (view[pos + 5] << 8) | view[pos + 6], (view[pos + 7] << 8) | view[pos + 8]
            return JpegFrame(height, width, view[pos + 9])
        if marker == 0xDA or length < 2:  # scan data before any frame header: malformed
            return None
        pos += 2 + length
    return None


def sample_crop_boxes(
    heights: torch.Tensor,
    widths: torch.Tensor,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    attempts: int = 10,
    *,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """RandomResizedCrop boxes ``[N, 4]`` as (top, left, height, width), for N images at once.

    Same distribution as torchvision's ``RandomResizedCrop.get_params``: up to ``attempts`` draws of an
    area fraction (uniform in ``scale``) and an aspect ratio (log-uniform in ``ratio``), the first that
    fits is used; otherwise the largest centred box whose ratio is clamped into ``ratio``. The draws come
    from ``generator``, or with ``generators`` (one per image) each image's from its own generator, so that
    an image's box does not depend on the other images of the batch.
    """
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must satisfy 0 < min <= max, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    h = heights.to(torch.float64).reshape(-1, 1)
    w = widths.to(torch.float64).reshape(-1, 1)
    n = h.shape[0]
    draws = 2 * attempts + 2  # area and aspect per attempt, then the box's position
    if generators is None:
        uniform = torch.rand(n, draws, generator=generator, dtype=torch.float64)
    elif len(generators) != n:
        raise ValueError(f"{len(generators)} generators for {n} images")
    else:
        rows = [torch.rand(1, draws, generator=g, dtype=torch.float64) for g in generators]
        uniform = torch.cat(rows) if rows else torch.empty(0, draws, dtype=torch.float64)
    area = h * w
    target = area * (scale[0] + (scale[1] - scale[0]) * uniform[:, :attempts])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * uniform[:, attempts : 2 * attempts])
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    fits = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    box_w = cw.gather(1, first).squeeze(1)
    box_h = ch.gather(1, first).squeeze(1)

    # Fallback: the whole image, narrowed to the nearest allowed aspect ratio, centred.
    hh, ww = h.squeeze(1), w.squeeze(1)
    in_ratio = ww / hh
    fb_w = torch.where(in_ratio < ratio[0], ww, torch.where(in_ratio > ratio[1], torch.round(hh * ratio[1]), ww))
    fb_h = torch.where(in_ratio < ratio[0], torch.round(ww / ratio[0]), hh)
    box_w = torch.where(found, box_w, fb_w)
    box_h = torch.where(found, box_h, fb_h)
    u = uniform[:, 2 * attempts :]
    top = torch.where(found, torch.floor(u[:, 0] * (hh - box_h + 1)), torch.floor((hh - box_h) / 2))
    left = torch.where(found, torch.floor(u[:, 1] * (ww - box_w + 1)), torch.floor((ww - box_w) / 2))
    return torch.stack([top, left, box_h, box_w], dim=1).to(torch.long)


def center_crop_boxes(heights: torch.Tensor, widths: torch.Tensor, image_size: int) -> torch.Tensor:
    """Boxes equivalent to Resize(round(image_size x 256/224)) + CenterCrop(image_size), in source pixels."""
    h = heights.to(torch.float64)
    w = widths.to(torch.float64)
    side = torch.clamp(torch.round(torch.minimum(h, w) * image_size / round(image_size * 256 / 224)), min=1)
    top = torch.round((h - side) / 2)
    left = torch.round((w - side) / 2)
    return torch.stack([top, left, side, side], dim=1).to(torch.long)


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class GpuAugment(torch.nn.Module):
    """Decode + RandomResizedCrop + flip + normalise a :class:`RawBytesCollator` batch on ``device``.

    ``forward(batch)`` returns ``{"pixel_values": float32 [B'', 3, S, S] on the device, "labels" (if
    given, filtered alike), "skipped_images": the collator's count plus the images that failed to
    decode}``, the same keys as :class:`~attndistill_hf.data.ImageCollator`. ``train=False`` gives the
    evaluation view (short side to S x 256/224, centre crop) instead.

    ``image_data`` should stay on the CPU (nvJPEG reads host memory); a device tensor is copied back.
    ``device=None`` picks CUDA when available, else the CPU. A batch with ``view_seeds`` (from
    :class:`RawBytesCollator`, for examples that carry their key) draws each image's crop and flip from its
    own seed, and counts an undecodable example only the first time it meets it (across ranks: see
    :class:`~attndistill_hf.data.streaming.UnreadableTally`, a collective per batch under several
    processes); ``seed`` makes the crops and flips of other batches reproducible.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        device: torch.device | str | None = None,
        *,
        train: bool = True,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_value("image_size", image_size, POSITIVE_INT)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each (RGB), got {list(mean)} and {list(std)}")
        check_value("std", list(std), POSITIVE)
        check_value("flip_prob", flip_prob, Bound(minimum=0, maximum=1))
        self.image_size = image_size
        self.device = torch.device(device) if device is not None else _default_device()
        self.train_mode = train
        self.scale = scale
        self.ratio = ratio
        self.flip_prob = flip_prob
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.unreadable = UnreadableTally()
        std_t = torch.tensor(std, dtype=torch.float32)
        # (x / 255 - mean) / std as one multiply-add.
        self.register_buffer("_mul", (1.0 / (255.0 * std_t)).view(1, 3, 1, 1).to(self.device), persistent=False)
        self.register_buffer(
            "_add",
            (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, 3, 1, 1).to(self.device),
            persistent=False,
        )

    # -- decoding ---------------------------------------------------------------------------------

    def _decode_fallback(self, data: torch.Tensor) -> torch.Tensor | None:
        image = decode_image(data.numpy().tobytes())
        if image is None:
            return None
        array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().to(self.device)

    def _decode_jpeg_one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return self._decode_fallback(data)

    def decode(self, image_data: torch.Tensor, image_lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Decode a flat byte batch to uint8 [3, h, w] images on the device; also a mask of the decoded ones."""
        if image_data.dtype != torch.uint8 or image_data.dim() != 1:
            raise ValueError(
                f"image_data must be a flat uint8 tensor, got {image_data.dtype} {tuple(image_data.shape)}"
            )
        image_data = image_data.cpu()
        lengths = [int(n) for n in image_lengths.tolist()]
        if sum(lengths) != image_data.numel():
            raise ValueError(f"image_lengths add up to {sum(lengths)} bytes but image_data holds {image_data.numel()}")
        pieces = list(torch.split(image_data, lengths)) if lengths else []
        decoded: list[torch.Tensor | None] = [None] * len(pieces)
        jpeg_idx = []
        for i, piece in enumerate(pieces):
            head = piece[:3].numpy().tobytes()
            frame = jpeg_frame(piece.numpy()) if head == _JPEG_MAGIC else None
            # nvJPEG decodes gray and YCbCr whole; CMYK / YCCK go to PIL, which converts them like the CPU path,
            # and so does a JPEG above MAX_IMAGE_PIXELS, which PIL decodes reduced (or skips).
            if frame is not None and frame.components in (1, 3) and frame.height * frame.width <= MAX_IMAGE_PIXELS:
                jpeg_idx.append(i)
            else:
                decoded[i] = self._decode_fallback(piece)
        if jpeg_idx:
            try:
                batch_out = decode_jpeg([pieces[i] for i in jpeg_idx], mode=ImageReadMode.RGB, device=self.device)
                for i, image in zip(jpeg_idx, batch_out, strict=True):
                    decoded[i] = image
            except RuntimeError:
                # One bad file fails the batched call: decode one by one to find it.
                for i in jpeg_idx:
                    decoded[i] = self._decode_jpeg_one(pieces[i])
        ok = torch.tensor([d is not None for d in decoded], dtype=torch.bool)
        return [d for d in decoded if d is not None], ok

    # -- augmentation -----------------------------------------------------------------------------

    def crop_boxes(self, sizes: torch.Tensor, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Crop boxes (top, left, height, width) for images of ``sizes`` [N, 2] = (height, width), drawn from
        ``generators`` (one per image) when given, else from the module's generator."""
        if self.train_mode:
            return sample_crop_boxes(
                sizes[:, 0], sizes[:, 1], self.scale, self.ratio, self.generator, generators=generators
            )
        return center_crop_boxes(sizes[:, 0], sizes[:, 1], self.image_size)

    def augment(self, images: list[torch.Tensor], generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Crop, resize, flip and normalise decoded uint8 images into float32 [N, 3, S, S] on the device.

        With ``generators`` (one per image), each image's crop and then its flip are drawn from its own.
        """
        s = self.image_size
        out = torch.empty((len(images), 3, s, s), dtype=torch.float32, device=self.device)
        if not images:
            return out
        sizes = torch.tensor([[img.shape[-2], img.shape[-1]] for img in images], dtype=torch.long)
        boxes = self.crop_boxes(sizes, generators).tolist()
        # On the CPU, antialiased resizing has a fast uint8 kernel for channels-last input (about 15x the
        # float one); CUDA has only the float kernel, which is fast there.
        on_cpu = self.device.type == "cpu"
        for k, (image, (top, left, height, width)) in enumerate(zip(images, boxes, strict=True)):
            crop = image[:, top : top + height, left : left + width].unsqueeze(0)
            crop = crop.contiguous(memory_format=torch.channels_last) if on_cpu else crop.to(torch.float32)
            out[k] = F.interpolate(crop, size=(s, s), mode="bilinear", align_corners=False, antialias=True)[0]
        if self.train_mode and self.flip_prob > 0:
            if generators is None:
                draws = torch.rand(len(images), generator=self.generator)
            else:
                draws = torch.cat([torch.rand(1, generator=g) for g in generators])
            flip = (draws < self.flip_prob).to(self.device)
            out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
        # Bilinear resampling stays within the input range, so no clamp to [0, 255] is needed.
        return out.mul_(self._mul).add_(self._add)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for key in ("image_data", "image_lengths"):
            if key not in batch:
                raise KeyError(f"GpuAugment needs a RawBytesCollator batch; {key!r} is missing (keys: {sorted(batch)})")
        images, ok = self.decode(batch["image_data"], batch["image_lengths"])
        skipped = batch.get("skipped_images", torch.tensor(0))
        decoded = ok.tolist()
        seeds = batch.get("view_seeds")
        generators = None
        if seeds is not None:
            generators = [
                torch.Generator().manual_seed(seed) for seed, good in zip(seeds, decoded, strict=True) if good
            ]
        result = {"pixel_values": self.augment(images, generators)}
        if "labels" in batch:
            result["labels"] = batch["labels"].to(ok.device)[ok].to(self.device)
        identities = batch.get("example_ids")
        if identities is None:
            failed = decoded.count(False)
        else:
            failed = self.unreadable.count_new([i for i, good in zip(identities, decoded, strict=True) if not good])
        result["skipped_images"] = (skipped.to("cpu") + failed).to(torch.long)
        return result
