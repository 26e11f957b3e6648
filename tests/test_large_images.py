"""Very large images are never decoded in full: a JPEG is decoded reduced, any other format is skipped and counted."""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from attndistill_hf.data import ImageCollator, decoding, eval_transform
from attndistill_hf.data.decoding import MAX_IMAGE_PIXELS, decode_image

from helpers import encode

SIDE = 10_000  # 100 megapixels: above the limit, and above PIL's own warning threshold


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_rgb_png(width: int, height: int) -> bytes:
    """A valid 8-bit RGB PNG of one colour, compressed row by row: never a whole image in memory."""
    compressor = zlib.compressobj()
    row = b"\x00" + b"\x40\x80\xc0" * width  # filter type 0, then the row's pixels
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("large") / "huge.png"
    path.write_bytes(blank_rgb_png(SIDE, SIDE))
    return path


class Decodes:
    """What happened while a test ran: (format, size) of every pixel decode by PIL, and every warning."""

    def __init__(self, caught: list[warnings.WarningMessage]) -> None:
        self.sizes: list[tuple[str, tuple[int, int]]] = []
        self.caught = caught

    def bomb_warnings(self) -> list[str]:
        return [str(w.message) for w in self.caught if issubclass(w.category, Image.DecompressionBombWarning)]


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Decodes]:
    load = ImageFile.ImageFile.load
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = Decodes(caught)

        def recording_load(self: ImageFile.ImageFile) -> object:
            if self.tile:  # pixels still to decode (later calls, e.g. from copy(), return the decoded ones)
                record.sizes.append((self.format or "", self.size))
            return load(self)

        monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
        yield record


def test_a_huge_png_is_skipped_from_its_header(huge_png: Path, decodes: Decodes) -> None:
    assert SIDE * SIDE > MAX_IMAGE_PIXELS and huge_png.stat().st_size < 2_000_000  # a decompression bomb
    data = huge_png.read_bytes()
    for value in (str(huge_png), huge_png, data, {"bytes": data, "path": None}):
        assert decode_image(value) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL's, as this test opens it itself
        opened = Image.open(huge_png)
    with opened:
        assert decode_image(opened) is None
    assert decodes.sizes == []  # not one pixel decoded
    assert decodes.bomb_warnings() == []

    small = decode_image(blank_rgb_png(8, 6))
    assert small is not None and small.size == (8, 6) and small.getpixel((7, 5)) == (0x40, 0x80, 0xC0)
    assert decodes.sizes == [("PNG", (8, 6))]


def test_a_skipped_huge_image_is_counted_like_an_unreadable_one(huge_png: Path, decodes: Decodes) -> None:
    batch = ImageCollator(eval_transform(8))([{"image": huge_png.read_bytes()}, {"image": blank_rgb_png(16, 16)}])
    assert batch["pixel_values"].shape == (1, 3, 8, 8)
    assert int(batch["skipped_images"]) == 1
    assert decodes.sizes == [("PNG", (16, 16))]


def test_a_huge_jpeg_is_decoded_reduced_with_its_aspect(decodes: Decodes) -> None:
    # 14000 x 7000 (98 megapixels, past PIL's warning too), left half black and right half white.
    image = Image.new("L", (14_000, 7_000), 0)
    image.paste(255, (7_000, 0, 14_000, 7_000))
    data = encode(image, "JPEG", quality=50)
    del image

    decoded = decode_image(data)
    assert decoded is not None and decoded.mode == "RGB"
    width, height = decoded.size
    assert width * height <= MAX_IMAGE_PIXELS and width == 2 * height
    assert decodes.sizes == [("JPEG", decoded.size)]  # decoded at that size, not decoded whole and then shrunk
    assert decoded.getpixel((width // 4, height // 2)) == (0, 0, 0)
    assert decoded.getpixel((3 * width // 4, height // 2)) == (255, 255, 255)
    assert decodes.bomb_warnings() == []


def test_jpegs_are_reduced_only_past_the_limit_and_by_the_least_factor(
    monkeypatch: pytest.MonkeyPatch, decodes: Decodes
) -> None:
    monkeypatch.setattr(decoding, "MAX_IMAGE_PIXELS", 10_000)  # small sizes, the same rule
    for size, expected in [
        ((100, 100), (100, 100)),  # at the limit: whole
        ((120, 100), (60, 50)),  # just past it: half
        ((400, 120), (100, 30)),  # a quarter: a half would still be 12000 pixels
        ((600, 300), (75, 38)),  # an eighth, the least that libjpeg offers (sizes round up)
    ]:
        decoded = decode_image(encode(Image.new("RGB", size, (10, 200, 30)), "JPEG"))
        assert decoded is not None and decoded.size == expected, size
    # Beyond an eighth, a JPEG cannot be reduced while decoding: skipped like any other format.
    assert decode_image(encode(Image.new("RGB", (1000, 800), (10, 200, 30)), "JPEG")) is None
    assert decodes.sizes == [("JPEG", (100, 100)), ("JPEG", (60, 50)), ("JPEG", (100, 30)), ("JPEG", (75, 38))]
