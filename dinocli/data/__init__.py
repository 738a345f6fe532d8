"""Image data: finding and decoding image files (:mod:`.images`), the training data set of
multi-crop views (:mod:`.multicrop_dataset`) and the built-in demo data set (:mod:`.demo_set`).

The names of :mod:`.images` are importable from here: ``from dinocli.data import find_images``.
"""

from dinocli.data.images import (
    IMAGE_EXTENSIONS,
    find_images,
    image_folder,
    load_rgb,
    open_rgb,
    resolve_data,
    to_rgb,
)

__all__ = ["IMAGE_EXTENSIONS", "find_images", "image_folder", "load_rgb", "open_rgb", "resolve_data", "to_rgb"]
