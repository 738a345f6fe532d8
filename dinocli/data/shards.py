"""WebDataset-style tar shards as image data: shard patterns, an index of samples, a writer.

A shard is an uncompressed tar file. A sample is a run of consecutive members that share a key:
the member name up to the first dot of its base name (``cat/0001.jpg`` and ``cat/0001.cls`` make
the sample ``cat/0001``; the extensions are ``jpg`` and ``cls``). The sample's image is its first
member whose extension is an image extension (``jpg jpeg png bmp webp tif tiff``, any case;
``0001.seg.png`` has the extension ``seg.png`` and is not the image); samples without one are left
out, as are hidden members. Labels come from a ``.cls`` member (an integer) when every sample has
one, else from the key's parent folder name (``cat``) when every key has one, else they are -1.

Shards are read by random access, not as a stream: one pass over the tar headers (no image data
is read; the result is cached, see :func:`index_shard`) lists every sample's image as a
:class:`ShardMember` (shard, member, offset, size), and reading an image is one seek and one read. Shards are thus a map-style data set like a folder:
item ``i`` is the ``i``-th sample in shard order, and everything keyed by the index (the
``(seed, epoch, index)`` crops, the epoch permutation, the split over processes and workers,
exact resume) is unchanged. Shards written from a folder by :func:`write_shards` hold its images
in :func:`~dinocli.data.images.find_images` order, so they train bit-identically to the folder.

``--data`` names shards as a brace pattern (``shards-{000000..000099}.tar``, several braces and
``{a,b}`` lists allowed), a ``.tar`` file, a folder holding only ``.tar`` files (sorted by name),
or several of these joined by ``::``; in Python also a list.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from dinocli.data.images import IMAGE_EXTENSIONS, find_images, image_folder, resolve_data
from dinocli.errors import UsageError
from dinocli.io import atomic_path, atomic_write_text, check_output_path

#: Extensions (after the key) of a sample's image member, lower case.
IMAGE_MEMBER_EXTENSIONS = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_PRINTF = re.compile(r"%0?\d*d")
_INDEX_VERSION = 1
_MAX_RANGE = 1_000_000  # a longer brace range is a typo


class ShardMember(NamedTuple):
    """An image stored in a tar shard: ``str()`` names it as ``SHARD:MEMBER`` in messages."""

    shard: str
    name: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"

    def read_bytes(self) -> bytes:
        """The member's bytes (one seek and one read)."""
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"shard truncated: {len(data)} of {self.size} bytes")
        return data


class ShardSample(NamedTuple):
    """A sample of a shard: its key, its image, and its ``.cls`` label (``None`` without one)."""

    key: str
    image: ShardMember
    cls: int | None


# -- naming shards ------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """Every name of a brace pattern, in order: ``{000..012}`` (zero-padded like its bounds),
    ``{a,b,c}``, several braces (the first varies slowest); no nesting."""
    match = _BRACE.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise UsageError(f"unbalanced braces in {pattern!r}")
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    if "{" in head or "}" in head:
        raise UsageError(f"nested or unbalanced braces in {pattern!r}")
    return [head + choice + rest for choice in _alternatives(match.group(1), pattern) for rest in expand_braces(tail)]


def _alternatives(body: str, pattern: str) -> list[str]:
    numbers = _RANGE.match(body)
    if numbers:
        lo, hi = numbers.groups()
        padded = any(len(b.lstrip("-")) > 1 and b.lstrip("-").startswith("0") for b in (lo, hi))
        width = max(len(lo), len(hi)) if padded else 0
        step = 1 if int(hi) >= int(lo) else -1
        if abs(int(hi) - int(lo)) >= _MAX_RANGE:
            raise UsageError(f"{{{body}}} in {pattern!r} names more than {_MAX_RANGE:,} shards")
        return [f"{n:0{width}d}" for n in range(int(lo), int(hi) + step, step)]
    if "," in body:
        return body.split(",")
    raise UsageError(f"{{{body}}} in {pattern!r} is neither a range {{000..099}} nor a list {{a,b}}")


def shard_paths(data: str | Path | Sequence[str | Path]) -> list[Path] | None:
    """The shards ``data`` names, in order, or ``None`` when it names an image folder (or ``demo``).

    Shards: a brace pattern, a ``.tar`` file, a folder whose top level holds ``.tar`` files and no
    images or sub-folders, ``::``-joined parts of these (any file name), or a list of them.
    """
    if isinstance(data, (str, Path)):
        text = str(data)
        path = Path(text)
        if text == "demo" or (path.is_dir() and not _shards_of_folder(path)):
            return None
        if not path.is_dir() and "{" not in text and "::" not in text and not text.lower().endswith(".tar"):
            return None  # a file or a missing folder: find_images says what is wrong
        parts = text.split("::")
    else:
        parts = [str(p) for p in data]
    if not parts:
        raise UsageError("no shards given")
    shards: list[Path] = []
    for part in parts:
        if Path(part).is_dir():
            found = _shards_of_folder(Path(part))
            if not found:
                raise UsageError(f"{part} is not a folder of shards (no .tar files, or images or folders too)")
            shards += found
            continue
        for name in expand_braces(part):
            path = Path(name)
            if not path.exists():
                raise UsageError(f"shard not found: {name}" + (f" (from {part})" if name != part else ""))
            if not path.is_file():
                raise UsageError(f"shard {name} is not a file")
            shards.append(path)
    return shards


def _shards_of_folder(folder: Path) -> list[Path]:
    """The ``.tar`` files of a folder of shards (sorted), or ``[]`` when it holds images or folders."""
    if not folder.is_dir():
        return []
    visible = [p for p in folder.iterdir() if not p.name.startswith(".")]
    tars = sorted(p for p in visible if p.suffix.lower() == ".tar" and p.is_file())
    if not tars or any(p.is_dir() or p.suffix.lower() in IMAGE_EXTENSIONS for p in visible):
        return []
    return tars


# -- reading shards -----------------------------------------------------------------------------


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's ``(key, extension)`` of a member name: ``a/b.seg.png`` -> ``("a/b", "seg.png")``."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def index_shard(shard: str | Path, cache: bool = True) -> list[ShardSample]:
    """The samples of one shard, in order, from one pass over its tar headers.

    With ``cache``, the index is kept in ``<cache>/shard-index/`` (``$DINOCLI_CACHE`` or
    ``~/.cache/dinocli``), keyed by the shard's absolute path, size and modification time, and
    read from there while the shard is unchanged (about 8x faster than the headers).
    """
    shard = Path(shard)
    try:
        stat = shard.stat()
    except OSError as exc:
        raise UsageError(f"cannot read shard {shard}: {exc}") from exc
    stamp = [str(shard.resolve()), stat.st_size, stat.st_mtime_ns]
    cached = _cached_index(shard, stamp) if cache else None
    if cached is not None:
        return cached
    samples = _read_index(shard)
    if cache:
        _store_index(stamp, samples)
    return samples


def _index_file(stamp: list) -> Path:
    from dinocli.data.demo_set import cache_dir

    return cache_dir() / "shard-index" / (hashlib.sha256(stamp[0].encode()).hexdigest()[:32] + ".json")


def _cached_index(shard: Path, stamp: list) -> list[ShardSample] | None:
    try:
        saved = json.loads(_index_file(stamp).read_text())
        if saved["version"] != _INDEX_VERSION or saved["stamp"] != stamp:
            return None
        return [
            ShardSample(split_name(name)[0], ShardMember(str(shard), name, offset, size), cls)
            for name, offset, size, cls in saved["samples"]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no cache yet, or one this version cannot read: index the headers


def _store_index(stamp: list, samples: list[ShardSample]) -> None:
    rows = [[s.image.name, s.image.offset, s.image.size, s.cls] for s in samples]
    try:
        target = _index_file(stamp)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, json.dumps({"version": _INDEX_VERSION, "stamp": stamp, "samples": rows}))
    except OSError:
        pass  # a read-only cache only costs the next start the header pass


def _read_index(shard: Path) -> list[ShardSample]:
    samples: list[ShardSample] = []
    key, image, cls = None, None, None
    try:
        size = shard.stat().st_size
        with tarfile.open(shard, mode="r:") as tar:
            for info in tar:
                if not info.isfile() or any(part.startswith(".") for part in info.name.split("/")):
                    continue
                if info.offset_data + info.size > size:
                    raise UsageError(f"shard {shard} is truncated (member {info.name})")
                member_key, ext = split_name(info.name)
                if member_key != key:
                    if image is not None:
                        samples.append(ShardSample(key, image, cls))
                    key, image, cls = member_key, None, None
                ext = ext.lower()
                if ext in IMAGE_MEMBER_EXTENSIONS and image is None:
                    image = ShardMember(str(shard), info.name, info.offset_data, info.size)
                elif ext == "cls":
                    cls = _read_cls(tar, info, shard)
    except tarfile.TarError as exc:
        raise UsageError(f"{shard} is not an uncompressed tar file ({exc})") from exc
    except OSError as exc:
        raise UsageError(f"cannot read shard {shard}: {exc}") from exc
    if image is not None:
        samples.append(ShardSample(key, image, cls))
    return samples


def _read_cls(tar: tarfile.TarFile, info: tarfile.TarInfo, shard: Path) -> int:
    text = tar.extractfile(info).read().decode("utf-8", "replace").strip()
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{shard}:{info.name} is not an integer class label: {text[:40]!r}") from None


def index_shards(shards: Sequence[str | Path]) -> list[ShardSample]:
    """The samples of every shard, in shard order; a clear error when none holds an image."""
    samples = [sample for shard in shards for sample in index_shard(shard)]
    if not samples:
        exts = ", ".join(sorted(IMAGE_MEMBER_EXTENSIONS))
        where = str(shards[0]) if len(shards) == 1 else f"{len(shards)} shards ({shards[0]} ...)"
        raise UsageError(f"no images found in {where} (looked for members ending {exts})")
    return samples


def labels_of(samples: Sequence[ShardSample]) -> tuple[list[int], list[str]]:
    """Labels and class names of samples: ``.cls`` members (classes named ``"0" "1" ...``), else
    the keys' parent folder names (sorted), else -1 and no classes."""
    if all(s.cls is not None for s in samples):
        labels = [int(s.cls) for s in samples]  # type: ignore[arg-type]
        return labels, [str(i) for i in range(max(labels) + 1)] if labels and min(labels) >= 0 else []
    if all("/" in s.key for s in samples):
        folders = [s.key.rsplit("/", 1)[0].rsplit("/", 1)[-1] for s in samples]
        classes = sorted(set(folders))
        index = {name: i for i, name in enumerate(classes)}
        return [index[f] for f in folders], classes
    return [-1] * len(samples), []


# -- --data: a folder or shards -----------------------------------------------------------------


def list_images(data: str | Path | Sequence[str | Path]) -> list[Path | ShardMember]:
    """Every image of ``--data``: the files of a folder (``demo``: the built-in set's training
    split), or the samples of tar shards."""
    shards = shard_paths(data)
    if shards is None:
        return list(find_images(resolve_data(data)))  # type: ignore[arg-type]
    return [s.image for s in index_shards(shards)]


def list_labelled_images(
    data: str | Path | Sequence[str | Path],
) -> tuple[list[Path | ShardMember], list[int], list[str]]:
    """Images of ``--data`` with labels and class names: :func:`~dinocli.data.images.image_folder`
    for a folder, :func:`labels_of` for shards."""
    shards = shard_paths(data)
    if shards is None:
        images, labels, classes = image_folder(data)  # type: ignore[arg-type]
        return list(images), labels, classes
    samples = index_shards(shards)
    labels, classes = labels_of(samples)
    return [s.image for s in samples], labels, classes


def as_image(item: str | Path | ShardMember) -> Path | ShardMember:
    """A file name as a :class:`~pathlib.Path`; a shard member as it is."""
    return item if isinstance(item, ShardMember) else Path(item)


# -- writing shards -----------------------------------------------------------------------------


def write_shards(folder: str | Path, pattern: str, max_count: int = 10_000) -> list[Path]:
    """Write the images under ``folder`` to tar shards of at most ``max_count`` images each.

    ``pattern`` names the shards with a printf field, e.g. ``"out/shards-%06d.tar"`` (numbered
    from 0). Images go in :func:`~dinocli.data.images.find_images` order, each as the member named
    by its path relative to ``folder`` (so labels come from the class folders, as for the folder);
    dots inside a file's stem become ``_`` (WebDataset's key ends at the first dot). Members have
    mtime 0 and no owner: the same folder gives the same bytes. Each shard is written atomically.
    Returns the shards written; :func:`brace_pattern` names them all for ``--data``.
    """
    if max_count < 1:
        raise UsageError(f"--max-count must be at least 1, got {max_count}")
    if pattern.count("%") != 1 or not _PRINTF.search(pattern):
        raise UsageError(f"the shard pattern needs one number field such as %06d: {pattern!r}")
    check_output_path(pattern % 0, "--output")
    root = Path(folder)
    images = find_images(root)
    names = _member_names(root, images)
    written: list[Path] = []
    for start in range(0, len(images), max_count):
        target = Path(pattern % (start // max_count))
        with atomic_path(target) as tmp, tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path, name in zip(images[start : start + max_count], names[start : start + max_count]):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = path.stat().st_size, 0, 0o644
                with open(path, "rb") as f:
                    tar.addfile(info, f)
        written.append(target)
    return written


def leftover_shards(pattern: str, count: int) -> list[Path]:
    """Shards named by ``pattern`` after the ``count`` just written (numbers ``count``, ``count + 1``,
    ... while they exist): what an earlier, larger run left. A folder of shards as ``--data`` would
    read them too."""
    found: list[Path] = []
    while (path := Path(pattern % (count + len(found)))).exists():
        found.append(path)
    return found


def brace_pattern(pattern: str, count: int) -> str:
    """The brace pattern that names the ``count`` shards :func:`write_shards` wrote with ``pattern``:
    ``"s-%06d.tar"``, 3 -> ``"s-{000000..000002}.tar"``."""
    field = _PRINTF.search(pattern)
    if field is None or count < 2:
        return pattern % 0
    numbers = field.group(0) % 0, field.group(0) % (count - 1)
    return pattern[: field.start()] + "{%s..%s}" % numbers + pattern[field.end() :]


def _member_names(root: Path, images: Sequence[Path]) -> list[str]:
    names, seen = [], {}
    for path in images:
        rel = path.relative_to(root)
        stem = rel.name[: -len(rel.suffix)] if rel.suffix else rel.name
        name = (rel.parent / (stem.replace(".", "_") + rel.suffix)).as_posix()
        key = split_name(name)[0]
        if key in seen:
            raise UsageError(f"{seen[key]} and {path} would share the shard key {key!r}; rename one")
        seen[key] = path
        names.append(name)
    return names


__all__ = [
    "IMAGE_MEMBER_EXTENSIONS",
    "ShardMember",
    "ShardSample",
    "as_image",
    "brace_pattern",
    "expand_braces",
    "index_shard",
    "index_shards",
    "labels_of",
    "leftover_shards",
    "list_images",
    "list_labelled_images",
    "shard_paths",
    "split_name",
    "write_shards",
]
