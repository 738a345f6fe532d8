"""Image data: finding and decoding image files (:mod:`.images`), tar shards (:mod:`.shards`),
the training data set of multi-crop views (:mod:`.multicrop_dataset`) and the built-in demo data
set (:mod:`.demo_set`).

The names of :mod:`.images` and the ``--data`` readers of :mod:`.shards` are importable from
here: ``from dinocli.data import find_images, list_images``.
"""

from dinocli.data.images import (
    DECODE_ERRORS,
    IMAGE_EXTENSIONS,
    find_images,
    image_file,
    image_folder,
    load_rgb,
    open_rgb,
    quiet_large_images,
    read_image_bytes,
    resolve_data,
    to_rgb,
)
from dinocli.data.shards import ShardMember, list_images, list_labelled_images, write_shards

__all__ = [
    "DECODE_ERRORS", "IMAGE_EXTENSIONS", "ShardMember", "find_images", "image_file", "image_folder",
    "list_images", "list_labelled_images", "load_rgb", "open_rgb", "quiet_large_images",
    "read_image_bytes", "resolve_data", "to_rgb", "write_shards",
]
