"""The JPEG crop decoder (data/jpeg_crop.c through data/jpeg_crop.py): built wherever libjpeg's
headers are, a crop's pixels bit for bit those of a whole decode (every chroma layout, progressive,
restart markers, grayscale; at 1/2, 1/4 and 1/8 as PIL's draft decodes), the header as PIL reads
it (EXIF, else XMP), and libjpeg's own words for a broken file."""

import io
import os
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from maelab.commands.bench_data import imagenet_like
from maelab.data import jpeg_crop

needs_decoder = pytest.mark.skipif(not jpeg_crop.available(), reason=f"no crop decoder: {jpeg_crop.missing}")


def jpeg(image: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90, **save)
    return out.getvalue()


def whole(data: bytes) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def boxes(height: int, width: int, count: int, seed: int) -> list:
    """Random boxes, and those that touch each edge, a single pixel and the whole image."""
    rng = np.random.default_rng(seed)
    drawn = []
    for _ in range(count):
        top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
        drawn.append((top, left, int(rng.integers(1, height - top + 1)), int(rng.integers(1, width - left + 1))))
    edges = [(0, 0, height, width), (0, 0, 1, 1), (height - 1, width - 1, 1, 1)]
    edges.append((max(height - 9, 0), 0, min(height, 9), width))
    if height > 32 and width > 32:  # edges on an iMCU's, and one column short of one
        edges += [(16, 16, height - 32, width - 32), (0, width - 17, height, 17)]
    return drawn + edges


def test_the_decoder_is_built_wherever_libjpeg_headers_are():
    """``make install`` compiles it (hatch_build.py); a machine with the headers that lacks it has
    lost the fast path's crop decode without a word."""
    prefixes = ["/usr/include", "/usr/local/include", os.environ.get("CONDA_PREFIX", "/nonexistent") + "/include"]
    if not any((Path(prefix) / "jpeglib.h").exists() for prefix in prefixes):
        pytest.skip("no libjpeg headers on this machine: the fast path decodes whole JPEGs here")
    assert jpeg_crop.available(), jpeg_crop.missing


KINDS = {
    "4:2:0": dict(subsampling=2),
    "4:2:2": dict(subsampling=1),
    "4:4:4": dict(subsampling=0),
    "progressive": dict(progressive=True),
    "restart markers": dict(restart_marker_rows=1),
    "optimized tables": dict(optimize=True),
}


@needs_decoder
@pytest.mark.parametrize("kind", [*KINDS, "grayscale"])
def test_a_crop_is_the_whole_decode_s_pixels_bit_for_bit(kind):
    """Odd sizes, so the crops end inside a chroma block; the columns either side of a crop are
    decoded too, or fancy upsampling would repeat the crop's edge instead of reading past it."""
    image = imagenet_like(np.random.default_rng(3)).resize((333, 251))
    data = jpeg(image.convert("L"), **KINDS["4:2:0"]) if kind == "grayscale" else jpeg(image, **KINDS[kind])
    full = whole(data)
    for top, left, h, w in boxes(251, 333, 60, seed=1):
        crop = jpeg_crop.decode(data, (top, left, h, w))
        assert crop.shape == (3, h, w) and crop.dtype == torch.uint8
        assert torch.equal(crop, full[:, top : top + h, left : left + w]), (kind, top, left, h, w)


def sampled_jpeg(tmp_path, width: int, height: int, luma_h: int, luma_v: int) -> bytes:
    """A JPEG with luma sampled luma_h x luma_v and chroma 1 x 1, written by libjpeg's own encoder
    (``jpeg_writer.c``, compiled here as the crop decoder was at install: PIL writes only 4:4:4,
    4:2:2 and 4:2:0)."""
    writer, out = tmp_path / "jpeg_writer", tmp_path / "sampled.jpg"
    compiler = [*shlex.split(os.environ.get("CC", "cc")), str(Path(__file__).with_name("jpeg_writer.c"))]
    built = subprocess.run([*compiler, "-o", str(writer), "-ljpeg"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    subprocess.run([str(writer), str(width), str(height), str(luma_h), str(luma_v), str(out)], check=True)
    return out.read_bytes()


@needs_decoder
@pytest.mark.parametrize(("luma_h", "luma_v"), [(4, 2), (2, 4)])
def test_a_crop_of_luma_sampled_4x2_is_right_at_every_scale(tmp_path, luma_h, luma_v):
    """libjpeg-turbo before 3.0 crops such a file's chroma rows wrongly at 1/2 and 1/4 (a
    component upsampled after an inverse DCT of another size), up to 90 levels off: it is decoded
    at full width there."""
    data = sampled_jpeg(tmp_path, 96, 64, luma_h, luma_v)
    assert jpeg_crop.header(data)[:3] == (64, 96, True)
    for r in (1, 2, 4, 8):
        height, width = -(-64 // r), -(-96 // r)
        scaled = jpeg_crop.decode(data, (0, 0, height, width), r)
        for top, left, h, w in boxes(height, width, 30, seed=r):
            assert torch.equal(jpeg_crop.decode(data, (top, left, h, w), r), scaled[:, top : top + h, left : left + w])


@needs_decoder
@pytest.mark.parametrize("r", [2, 4, 8])
def test_a_reduced_crop_is_libjpeg_s_scaled_image_as_pil_draft_decodes_it(r):
    data = jpeg(imagenet_like(np.random.default_rng(4)).resize((1001, 757)))
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (im.width // r, im.height // r))
        scaled = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    height, width = scaled.shape[1:]
    assert (height, width) == (-(-757 // r), -(-1001 // r))
    for top, left, h, w in boxes(height, width, 30, seed=r):
        assert torch.equal(jpeg_crop.decode(data, (top, left, h, w), r), scaled[:, top : top + h, left : left + w])


@needs_decoder
def test_the_header_is_read_as_pil_reads_it():
    image = imagenet_like(np.random.default_rng(5)).resize((120, 90))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        for order in ("little", "big"):  # II and MM TIFF byte orders
            data = jpeg(image, exif=exif.tobytes() if order == "little" else big_endian_exif(orientation))
            with Image.open(io.BytesIO(data)) as im:
                assert im.getexif().get(0x0112) == orientation
            assert jpeg_crop.header(data) == (90, 120, True, orientation), (orientation, order)
    assert jpeg_crop.header(jpeg(image)) == (90, 120, True, 1)  # no EXIF
    assert jpeg_crop.header(jpeg(image.convert("L"))) == (90, 120, True, 1)
    assert jpeg_crop.header(jpeg(image.convert("CMYK"))) == (90, 120, False, 1)  # left to PIL


@needs_decoder
def test_an_xmp_orientation_counts_where_exif_has_none_as_with_pil():
    image = imagenet_like(np.random.default_rng(7)).resize((40, 30))
    turned, other = Image.Exif(), Image.Exif()
    turned[0x0112] = 3
    other[0x010F] = "camera maker"  # an EXIF block without Orientation
    packet = lambda n: f'<x:xmpmeta><rdf:Description tiff:Orientation="{n}"/></x:xmpmeta>'.encode()  # noqa: E731
    cases = {
        "xmp only": dict(xmp=packet(6)),
        "exif wins": dict(exif=turned.tobytes(), xmp=packet(6)),
        "exif without orientation": dict(exif=other.tobytes(), xmp=packet(8)),
        "element form": dict(xmp=b"<tiff:Orientation>5</tiff:Orientation>"),
        "no digit": dict(xmp=b'tiff:Orientation="x" tiff:Orientation>7'),
    }
    for name, save in cases.items():
        data = jpeg(image, **save)
        with Image.open(io.BytesIO(data)) as im:
            expected = im.getexif().get(0x0112, 1)
        assert jpeg_crop.header(data).orientation == expected, (name, expected)
    assert [jpeg_crop.header(jpeg(image, **save)).orientation for save in cases.values()] == [6, 3, 8, 5, 7]


def tiff_block(order: str, kind: int, count: int, value: bytes, magic: bytes | None = None, prefixes: int = 1) -> bytes:
    """An EXIF block with one IFD0 entry, Orientation, of the given TIFF type and count."""
    big = order == "MM"
    number = lambda n, k: n.to_bytes(k, "big" if big else "little")  # noqa: E731
    magic = magic or (b"MM\0\x2a" if big else b"II\x2a\0")
    entry = number(0x0112, 2) + number(kind, 2) + number(count, 4) + value
    return b"Exif\0\0" * prefixes + magic + number(8, 4) + number(1, 2) + entry + b"\0\0\0\0"


@needs_decoder
@pytest.mark.filterwarnings("ignore:Metadata Warning")  # PIL's, on the block of two values
def test_an_exif_block_this_reader_might_read_otherwise_than_pil_is_left_to_pil():
    """The crop decoder turns a file by its own reading of the orientation; where that could part
    from PIL's (types, counts, headers PIL reads its own way) it says UNSURE (-2) and PIL reads the
    file. Never another value than PIL's."""
    image = imagenet_like(np.random.default_rng(8)).resize((40, 30))
    cases = {
        "big-endian SLONG": (tiff_block("MM", 9, 1, b"\0\0\0\x06"), -2),
        "big-endian BYTE": (tiff_block("MM", 1, 1, b"\x06\0\0\0"), -2),
        "two values": (tiff_block("II", 3, 2, b"\x06\0\x06\0"), -2),
        "no TIFF header": (tiff_block("II", 3, 1, b"\x06\0\0\0", magic=b"XX\x2a\0"), -2),
        "Exif twice": (tiff_block("II", 3, 1, b"\x06\0\0\0", prefixes=2), 6),
        "LONG": (tiff_block("II", 4, 1, b"\x08\0\0\0"), 8),
        "LONG out of range": (tiff_block("II", 4, 1, (2**31 + 6).to_bytes(4, "little")), 9),
    }
    for name, (block, expected) in cases.items():
        data = jpeg(image, exif=block)
        with Image.open(io.BytesIO(data)) as im:
            pil = im.getexif().get(0x0112, 1)
        ours = jpeg_crop.header(data).orientation
        assert ours == expected and (ours == -2 or ours == pil or (ours == 9 and pil > 8)), (name, ours, pil)


@needs_decoder
def test_an_empty_file_is_an_error_not_a_crash():
    for call in (lambda: jpeg_crop.header(b""), lambda: jpeg_crop.decode(b"", (0, 0, 1, 1))):
        with pytest.raises(OSError, match="Empty input file"):
            call()


def big_endian_exif(orientation: int) -> bytes:
    """An EXIF block in Motorola order (MM), as some cameras write it: one IFD0 entry."""
    entry = (0x0112).to_bytes(2, "big") + (3).to_bytes(2, "big") + (1).to_bytes(4, "big")
    entry += orientation.to_bytes(2, "big") + b"\0\0"
    return b"Exif\0\0MM\0\x2a" + (8).to_bytes(4, "big") + (1).to_bytes(2, "big") + entry + b"\0\0\0\0"


@needs_decoder
def test_a_broken_file_gets_libjpeg_s_words():
    data = jpeg(imagenet_like(np.random.default_rng(6)).resize((300, 200)))
    with pytest.raises(OSError, match="Premature end of JPEG file"):
        jpeg_crop.decode(data[: len(data) // 2], (150, 0, 50, 300))  # cut above the crop's last row
    assert not jpeg_crop.complete(data[: len(data) // 2]) and jpeg_crop.complete(data)
    with pytest.raises(OSError, match="Not a JPEG file|Unsupported marker"):
        jpeg_crop.header(b"\xff\xd8\xff" + b"\x17" * 64)
    with pytest.raises(OSError, match=r"crop \(150, 0, 60, 300\) outside the 300x200 image at 1/1"):
        jpeg_crop.decode(data, (150, 0, 60, 300))
    assert torch.equal(jpeg_crop.decode(data[: len(data) // 2], (0, 0, 40, 300)), whole(data)[:, :40])
