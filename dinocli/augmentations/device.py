"""Decoding, cropping and resizing on the training device: data-loading workers only read bytes.

``--augment-on gpu`` (and ``extract_features`` on a CUDA device) sends each image's encoded JPEG
bytes to the device, where a batch is decoded at once (``torchvision.io.decode_jpeg``: nvJPEG on
CUDA, libjpeg-turbo on the CPU), then every view is cut, resized and flipped by two batched matrix
products per view size, then coloured by :mod:`dinocli.augmentations.gpu`. Files that are not
JPEG (or are CMYK JPEGs) are decoded by the worker with PIL and sent as pixels.

The resize is torch's antialiased interpolation (``F.interpolate(..., antialias=True)``, the
filter PIL uses: bicubic ``a = -0.5`` or triangle, widened by the reduction factor), written as a
weight matrix per view and axis: row ``i`` of a view holds the weights of output pixel ``i`` over
the pixels of the whole (padded) image, zero outside the crop box, reversed for a flipped view.
In float32 this equals ``F.interpolate`` on the float crop to about 1e-4 level; the result is
rounded to whole levels, as the CPU path's uint8 kernel (which rounds its weights to fixed point)
does, so the two differ by at most a level or two on a few pixels. The random parameters are the
CPU path's (the same :meth:`DinoMultiCrop.plan` draws); the image is always decoded at full size
(the CPU path may decode a large JPEG at reduced size, see ``draft_factor``).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from PIL import Image

from dinocli.augmentations.gpu import ColourParams, colour_batch, normalize
from dinocli.augmentations.params import ViewParams

#: Half-width, in source pixels at reduction 1, of each antialiased filter (torch's and PIL's).
FILTER_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}
_BICUBIC_A = -0.5


def _filter(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    x = x.abs()
    if interpolation == "bilinear":
        return (1 - x).clamp_min_(0)
    a = _BICUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(
    start: torch.Tensor,
    length: torch.Tensor,
    out_size: torch.Tensor,
    padded: int,
    count: int,
    offset: torch.Tensor | None = None,
    flip: torch.Tensor | None = None,
    interpolation: str = "bicubic",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Weight matrices ``[N, count, padded]`` (float32) of an antialiased 1-d resize per view.

    View ``n`` resizes the source pixels ``start .. start + length`` to ``out_size`` pixels and
    keeps outputs ``offset .. offset + count`` (a centre crop; ``offset`` 0 by default), reversed
    where ``flip``. The rule is torch's ``_compute_indices_weights_aa`` (and PIL's): output ``i``
    is centred at ``(i + 0.5) * scale`` with ``scale = length / out_size``; its filter is
    stretched by ``max(scale, 1)`` and its weights, cut to the box, are normalised to sum 1.
    The geometry comes as CPU tensors and the weights are made on ``device`` (``start``'s by
    default): the host reads nothing back from the device.
    """
    if interpolation not in FILTER_SUPPORT:
        raise ValueError(f"no device resize for interpolation {interpolation!r}")
    dev = torch.device(device) if device is not None else start.device
    widest = float((length.double() / out_size.double()).clamp_min(1.0).max())  # where they are: the CPU
    taps = math.ceil(2 * FILTER_SUPPORT[interpolation] * widest) + 2
    start, length, out_size = (
        t.to(torch.float64).to(dev, non_blocking=True).view(-1, 1) for t in (start, length, out_size)
    )
    i = torch.arange(count, device=dev, dtype=torch.float64).view(1, -1)
    if offset is not None:
        i = i + offset.to(torch.float64).to(dev, non_blocking=True).view(-1, 1)
    scale = length / out_size
    stretch = scale.clamp_min(1.0)
    support = FILTER_SUPPORT[interpolation] * stretch
    center = scale * (i + 0.5)  # [N, count]
    lo = (center - support + 0.5).trunc().clamp_min(0)
    hi = torch.minimum((center + support + 0.5).trunc(), length)
    x = lo.unsqueeze(-1) + torch.arange(taps, device=dev, dtype=torch.float64)  # [N, count, taps]
    w = _filter((x - center.unsqueeze(-1) + 0.5) / stretch.unsqueeze(-1), interpolation)
    w = w * (x < hi.unsqueeze(-1))
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    if flip is not None:
        j = torch.arange(count, device=dev)
        index = torch.where(flip.view(-1, 1).to(dev, non_blocking=True), count - 1 - j, j).unsqueeze(-1).expand_as(w)
        w, x = w.gather(1, index), x.gather(1, index)
    column = (x + start.unsqueeze(-1)).clamp_(0, padded - 1).long()
    dense = torch.zeros(w.shape[0], count, padded, dtype=torch.float32, device=dev)
    return dense.scatter_add_(2, column, w.float())


@contextlib.contextmanager
def _exact_matmul() -> Iterator[None]:
    """float32 matrix products without TF32 (whose 10-bit mantissa would move levels)."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def resample(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Views ``[B, V, 3, h, w]`` (whole float levels, 0-255) of ``images`` ``[B, 3, H, W]``.

    ``rows``: ``[B, V, h, H]`` and ``cols``: ``[B, V, w, W]`` from :func:`resize_weights`; each
    view is ``rows @ image @ cols^T`` per channel, done as two batched products.
    """
    b, _, height, width = images.shape
    v, h, w = rows.shape[1], rows.shape[2], cols.shape[2]
    hwc = images.float().permute(0, 2, 3, 1).reshape(b, height, width * 3)
    with _exact_matmul():
        tall = torch.bmm(rows.reshape(b, v * h, height), hwc)  # [B, V*h, W*3]
        tall = tall.view(b * v, h, width, 3).permute(0, 2, 1, 3).reshape(b * v, width, h * 3)
        out = torch.bmm(cols.reshape(b * v, w, width), tall)  # [B*V, w, h*3]
    out = out.view(b, v, w, h, 3).permute(0, 1, 4, 3, 2)
    return out.round_().clamp_(0, 255)


def decode(items: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 ``[3, H, W]`` images on ``device``: 1-d items are encoded JPEGs (decoded together on
    the device), 3-d items are pixels already. ``None`` where a JPEG cannot be decoded."""
    out: list[torch.Tensor | None] = [None] * len(items)
    encoded = [k for k, item in enumerate(items) if item.dim() == 1]
    if encoded:
        decode_batch = _decode_on_cuda if device.type == "cuda" else _decode_batch
        for k, image in zip(encoded, decode_batch([items[k] for k in encoded], device)):
            out[k] = None if image is None else image.to(device, non_blocking=True)
    for k, item in enumerate(items):
        if item.dim() == 3:
            out[k] = item.to(device, non_blocking=True)
    return out


def _decode_batch(data: list[torch.Tensor], where: torch.device) -> list[torch.Tensor | None]:
    from torchvision.io import ImageReadMode, decode_jpeg

    target = where if where.type == "cuda" else "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=target)
        except RuntimeError:  # a bad file: decode one by one, then with PIL
            return [_decode_one(d, target) for d in data]


def _decode_on_cuda(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """nvJPEG decoding that cannot overwrite memory kernels still queued will read.

    torchvision's decoder takes its output from the caching allocator of the *current* stream and
    writes it from a stream of its own (and nvJPEG's hardware engine writes at once), so a block
    the training step has just freed, with its last reads still queued, can be overwritten
    (pytorch/vision#9606: corrupted sums on an H100). Decoding with a stream of ours current
    takes the memory from that stream's pool, which holds only the decoder's earlier outputs;
    each output is marked used by the compute stream (``record_stream``), so its block returns
    to that pool only once the compute stream's queued work on it is done. The host does not wait.
    """
    compute = torch.cuda.current_stream(device)
    side = _decode_stream(device)
    with torch.cuda.stream(side):
        decoded = _decode_batch(data, device)
    compute.wait_stream(side)
    for image in decoded:
        if image is not None and image.is_cuda:
            image.record_stream(compute)
    return decoded


@functools.cache
def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _decode_one(data: torch.Tensor, where: str | torch.device) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=where)
    except RuntimeError:
        pass
    from dinocli.data.images import DECODE_ERRORS, quiet_large_images

    try:
        with quiet_large_images():
            return pixels(Image.open(io.BytesIO(data.numpy().tobytes())))
    except DECODE_ERRORS:
        return None


def pixels(image: Image.Image) -> torch.Tensor:
    """A PIL image decoded to RGB as uint8 ``[3, H, W]``."""
    from dinocli.data.images import load_rgb

    rgb = load_rgb(image)
    flat = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return flat.view(rgb.height, rgb.width, 3).permute(2, 0, 1)


def read_for_device(data: bytes, opened: Image.Image) -> torch.Tensor:
    """What a worker sends for an image: ``data``, the encoded bytes ``opened`` was opened from
    (``Image.open(io.BytesIO(data))``, not yet loaded), as uint8 1-d when the device can decode it (a
    baseline or progressive RGB/grey JPEG), else its RGB pixels decoded here (``[3, H, W]``).
    The file is read once: ``data = read_image_bytes(path)``."""
    if opened.format == "JPEG" and opened.mode in ("RGB", "L"):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return pixels(opened)


def pad_batch(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Images of different sizes in one uint8 ``[B, 3, H_max, W_max]`` tensor (zeros beyond each)."""
    height = max(int(x.shape[1]) for x in images)
    width = max(int(x.shape[2]) for x in images)
    if all(tuple(x.shape[1:]) == (height, width) for x in images):
        return torch.stack(list(images))
    out = images[0].new_zeros(len(images), 3, height, width)
    for k, x in enumerate(images):
        out[k, :, : x.shape[1], : x.shape[2]] = x
    return out


# --- training: every multi-crop view of a batch -------------------------------------------------


class EncodedViews(NamedTuple):
    """One image as a worker sends it for ``--augment-on gpu``: encoded bytes (or pixels, see
    :func:`read_for_device`), each view's box and flip (``[V, 5]``: top, left, height, width,
    flip) and colour parameters, the file (named when it cannot be decoded), each view's size,
    the normalisation, and what to do with an undecodable file (``skip`` or ``fail``)."""

    data: torch.Tensor
    boxes: torch.Tensor
    colour: ColourParams
    path: str
    sizes: tuple[int, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    on_bad_image: str = "skip"


def view_boxes(params: Sequence[ViewParams]) -> torch.Tensor:
    """``[V, 5]`` int64: top, left, height, width, flip of each view."""
    return torch.tensor([[p.top, p.left, p.height, p.width, int(p.flip)] for p in params], dtype=torch.int64)


class EncodedBatch:
    """A batch of :class:`EncodedViews`; :meth:`finish` decodes, crops, resizes, flips and colours
    every view on a device and returns the normalised float views, one ``[B, 3, s, s]`` per view."""

    def __init__(self, items: Sequence[EncodedViews]) -> None:
        first = items[0]
        self.data = [item.data for item in items]
        self.paths = [item.path for item in items]
        self.boxes = torch.stack([item.boxes for item in items])  # [B, V, 5]
        self.colour = ColourParams.stack([item.colour for item in items])  # [B, V, ...], in the worker
        self.sizes, self.mean, self.std = first.sizes, first.mean, first.std
        self.on_bad_image = first.on_bad_image
        self.n_dropped = 0  # images that could not be decoded on the device (skipped)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def n_images(self) -> int:
        return len(self.data)

    def pin_memory(self) -> EncodedBatch:
        """Called by ``DataLoader(pin_memory=True)``: the bytes go to the device without a copy."""
        self.data = [d.pin_memory() for d in self.data]
        return self

    def finish(self, device: torch.device | str) -> list[torch.Tensor]:
        """The normalised float32 views on ``device``, as the CPU path's batch would give them."""
        device = torch.device(device)
        images = decode(self.data, device)
        keep = [k for k, x in enumerate(images) if x is not None]
        if len(keep) < len(images):
            bad = [self.paths[k] for k, x in enumerate(images) if x is None]
            if self.on_bad_image == "fail":
                from dinocli.data.multicrop_dataset import BadImageError

                raise BadImageError(f"cannot decode image {bad[0]} on {device}")
            self.n_dropped = len(bad)
            if not keep:
                return []
        batch = pad_batch([images[k] for k in keep])
        boxes = self.boxes[keep]  # on the CPU: resize_weights reads nothing back from the device
        crops: list[torch.Tensor] = [torch.empty(0)] * len(self.sizes)
        for size in dict.fromkeys(self.sizes):
            views = [v for v, s in enumerate(self.sizes) if s == size]
            b = boxes[:, views].reshape(-1, 5)
            full = b.new_full((b.shape[0],), size)
            rows = resize_weights(b[:, 0], b[:, 2], full, batch.shape[2], size, device=device)
            cols = resize_weights(b[:, 1], b[:, 3], full, batch.shape[3], size, flip=b[:, 4].bool(), device=device)
            shape = (len(keep), len(views), size, -1)
            out = resample(batch, rows.view(shape), cols.view(shape))
            for j, v in enumerate(views):
                crops[v] = out[:, j]
        return colour_batch(crops, self.colour.per_view(keep), self.mean, self.std, device)


# --- evaluation: resize the shorter side, centre crop ------------------------------------------


class UndecodableImage(ValueError):
    """Item ``index`` of a batch could not be decoded."""

    def __init__(self, index: int) -> None:
        super().__init__(f"item {index} of the batch cannot be decoded")
        self.index = index


def eval_views(
    items: Sequence[torch.Tensor],
    resize: int,
    crop_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """torchvision's ``Resize(resize)`` + ``CenterCrop(crop_size)`` + ``ToTensor`` + ``Normalize``
    of a batch of encoded JPEGs or pixels (see :func:`decode`), on ``device``: float32
    ``[B, 3, crop_size, crop_size]``. Raises :class:`UndecodableImage` for the first bad item."""
    images = decode(items, device)
    bad = [k for k, x in enumerate(images) if x is None]
    if bad:
        raise UndecodableImage(bad[0])
    sizes = torch.tensor([[x.shape[1], x.shape[2]] for x in images], dtype=torch.float64)
    h, w = sizes[:, 0], sizes[:, 1]
    short, long = torch.minimum(h, w), torch.maximum(h, w)
    new_long = (resize * long / short).floor()  # torchvision: int(size * long / short)
    new_h = torch.where(h <= w, torch.full_like(h, resize), new_long)
    new_w = torch.where(h <= w, new_long, torch.full_like(w, resize))
    top = ((new_h - crop_size) / 2).round()  # torchvision: int(round((h - crop) / 2))
    left = ((new_w - crop_size) / 2).round()
    batch = pad_batch(images)
    zero = torch.zeros_like(h)
    rows, cols = (
        resize_weights(zero, n, s, batch.shape[axis], crop_size, offset=o, interpolation=interpolation,
                       device=device)
        for n, s, o, axis in ((h, new_h, top, 2), (w, new_w, left, 3))
    )  # fmt: skip
    out = resample(batch, rows.unsqueeze(1), cols.unsqueeze(1))[:, 0]
    return normalize(out, mean, std)
