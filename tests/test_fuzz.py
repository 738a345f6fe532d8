"""Fuzzing with hypothesis: configuration parsing, image decoding and weights reading raise only
their documented errors, whatever the bytes.

- configuration (TOML files, command-line overrides): :class:`dinocli.errors.UsageError` or a config;
- images: ``open_rgb`` gives an RGB image or one of the decode errors below; the training data set
  skips the file (``on_bad_image="skip"``) or raises :class:`dinocli.data.multicrop_dataset.BadImageError`;
- weights files: :class:`dinocli.errors.DinoError` (``UsageError`` for unreadable files).
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import zipfile
import zlib

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

import broken_files as bf
from dinocli.data import open_rgb
from dinocli.data.multicrop_dataset import BadImageError, MultiCropDataset
from dinocli.errors import DinoError, UsageError
from dinocli.registry import create_augmentation
from dinocli.train.config import FIELDS, PretrainConfig, resolve_config
from dinocli.weights import read_backbone_weights

#: What decoding an image may raise (UnidentifiedImageError is an OSError), as documented in docs/reliability.md.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

#: Examples per fuzz test; set DINOCLI_FUZZ_EXAMPLES=5000 to fuzz for longer.
EXAMPLES = int(os.environ.get("DINOCLI_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- configuration ---------------------------------------------------------------------------------

NAMES = sorted(FIELDS)
keys = st.one_of(
    st.sampled_from(NAMES),
    st.sampled_from([n.replace("_", "-") for n in NAMES]),
    st.text(min_size=1, max_size=12),
)
scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=16),
    st.sampled_from(["vit_tiny", "adamw", "skip", "fp32", "centering", "dino", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(min_size=1, max_size=6), inner, max_size=3),
    ),
    max_leaves=6,
)


def toml_value(value) -> str:
    """``value`` written as TOML (strings as JSON, which TOML basic strings read the same)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}" for k, v in value.items()) + "}"


def resolves_or_usage_error(*args, **kwargs) -> None:
    try:
        cfg = resolve_config(*args, **kwargs)
    except UsageError as exc:
        assert str(exc).strip()  # a message to show (the CLI prints it as one line)
        return
    assert isinstance(cfg, PretrainConfig)


@FUZZ
@given(st.dictionaries(keys, values, max_size=6))
def test_random_toml_tables_give_a_config_or_a_usage_error(tmp_path, table):
    path = tmp_path / "fuzz.toml"
    text = "".join(f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}\n" for k, v in table.items())
    path.write_text('data = "images"\noutput = "run"\n' * ("data" not in table) + text, encoding="utf-8")
    resolves_or_usage_error(path)


@FUZZ
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_random_text_as_a_config_file_gives_a_usage_error_at_worst(tmp_path, text):
    path = tmp_path / "fuzz.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    resolves_or_usage_error(path, {"data": "images", "output": "run"})


python_values = st.one_of(values, st.none(), st.tuples(scalars, scalars), st.binary(max_size=8))


@FUZZ
@given(st.dictionaries(st.one_of(st.sampled_from(NAMES), st.text(max_size=10)), python_values, max_size=6))
def test_random_command_line_overrides_give_a_config_or_a_usage_error(overrides):
    resolves_or_usage_error(overrides={"data": "images", "output": "run", **overrides})


# -- images ----------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@st.composite
def png_with_random_header(draw) -> bytes:
    side = st.one_of(st.integers(0, 300), st.integers(0, 3000), st.sampled_from([2**31 - 1, 60_000, 13_400]))
    ihdr = struct.pack(
        ">IIBBBBB", draw(side), draw(side),
        draw(st.sampled_from([1, 2, 4, 8, 16, 3, 0, 255])), draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7])),
        draw(st.integers(0, 2)), draw(st.integers(0, 2)), draw(st.integers(0, 2)),
    )
    body = draw(st.binary(max_size=400))
    chunks = [png_chunk(b"IHDR", ihdr)]
    if draw(st.booleans()):
        chunks.append(png_chunk(b"PLTE", draw(st.binary(max_size=60))))
    chunks.append(png_chunk(b"IDAT", zlib.compress(body) if draw(st.booleans()) else body))
    if draw(st.booleans()):
        chunks.append(png_chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


@st.composite
def jpeg_with_random_header(draw) -> bytes:
    height, width = draw(st.integers(0, 3000)), draw(st.integers(0, 3000))
    components = draw(st.sampled_from([1, 3, 4, 0, 2]))
    sof = struct.pack(">BHHB", 8, height, width, components) + b"".join(
        struct.pack(">BBB", i + 1, draw(st.sampled_from([0x11, 0x22, 0x21, 0x00])), 0) for i in range(components)
    )
    marker = draw(st.sampled_from([b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"]))
    return b"\xff\xd8" + marker + struct.pack(">H", len(sof) + 2) + sof + draw(st.binary(max_size=400))


@st.composite
def mutated_real_image(draw) -> bytes:
    data = bytearray(draw(st.sampled_from([bf.png_bytes(24, 20), bf.jpeg_bytes(24, 20)])))
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    cut = draw(st.one_of(st.just(len(data)), st.integers(0, len(data))))
    return bytes(data[:cut])


image_bytes = st.one_of(st.binary(max_size=600), png_with_random_header(), jpeg_with_random_header(),
                        mutated_real_image())


@pytest.fixture(scope="module")
def augmentation():
    return create_augmentation("dino", global_crop_size=32, local_crop_size=16, local_crops_number=1)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # a header may claim a large image
@settings(FUZZ, max_examples=2 * EXAMPLES)
@given(data=image_bytes, suffix=st.sampled_from([".png", ".jpg", ".webp", ".tif", ".bmp"]))
def test_random_image_bytes_decode_or_raise_a_documented_error(tmp_path, augmentation, data, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        image = open_rgb(path)
    except DECODE_ERRORS:
        decodable = False
    else:
        decodable = True
        assert image.mode == "RGB"
    event("decoded" if decodable else "refused")  # shown by --hypothesis-show-statistics
    skipping = MultiCropDataset([path], augmentation, on_bad_image="skip")
    failing = MultiCropDataset([path], augmentation, on_bad_image="fail")
    if decodable:
        views = skipping[0]
        assert [tuple(v.shape) for v in views] == [(3, 32, 32), (3, 32, 32), (3, 16, 16)]
        assert all(torch.isfinite(v).all() for v in views)
    else:
        assert skipping[0] is None
        with pytest.raises(BadImageError, match=f"^cannot decode image {path}: "):
            failing[0]


# -- weights files ---------------------------------------------------------------------------------


@st.composite
def safetensors_like(draw) -> bytes:
    header = draw(st.one_of(
        st.binary(max_size=200),
        st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(st.text(max_size=8), values, max_size=4)),
        st.just(b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}'),
        st.just(b'{"w": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 16]}}'),
    ))
    if not header.startswith(b"{"):
        header = b"{" + header
    length = draw(st.one_of(st.just(len(header)), st.integers(0, 2**64 - 1)))
    return struct.pack("<Q", length) + header + draw(st.binary(max_size=64))


@st.composite
def zip_like(draw) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name in draw(st.lists(st.sampled_from(
            ["archive/data.pkl", "archive/version", "archive/data/0", "model/constants.pkl", "model/code/x.py",
             "archive/byteorder"]), max_size=4, unique=True)):
            archive.writestr(name, draw(st.binary(max_size=100)))
    data = buf.getvalue()
    return data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data


@FUZZ
@given(st.one_of(st.binary(max_size=500), safetensors_like(), zip_like()))
def test_random_weights_files_raise_only_dinocli_errors(tmp_path, data):
    path = tmp_path / "fuzz.pth"
    path.write_bytes(data)
    try:
        read_backbone_weights(path)
    except DinoError as exc:
        assert str(path) in str(exc) or "weights" in str(exc)
