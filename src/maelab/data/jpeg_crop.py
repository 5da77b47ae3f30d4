"""libjpeg-turbo's crop decode (``jpeg_crop.c``) for ``data.decode=fast``, through ctypes.

The library is compiled when maelab is installed (``hatch_build.py``), against the libjpeg(-turbo)
headers of the machine (Debian and Ubuntu: ``libjpeg-dev``; conda: ``libjpeg-turbo``). Without
them the install goes on without it, and the fast path decodes whole JPEGs instead (``missing``
says why; the datamodule logs it once).
"""

import ctypes
import hashlib
from pathlib import Path
from typing import NamedTuple

import torch

LIBRARY = Path(__file__).with_name("_jpeg_crop.so")
MESSAGE_BYTES = 200  # libjpeg's JMSG_LENGTH_MAX


class Header(NamedTuple):
    height: int  # as stored, before the EXIF orientation turns it
    width: int
    rgb: bool  # decoded to RGB here: grayscale, YCbCr or RGB (not CMYK or YCCK)
    orientation: int  # the EXIF tag, 1 without one


def _load() -> tuple[ctypes.CDLL | None, str]:
    """The library, or None and why not (with the remedy)."""
    if not LIBRARY.exists():
        return None, (f"{LIBRARY.name} was not built when maelab was installed: it needs a C compiler and libjpeg's "
                      "headers (Debian/Ubuntu: libjpeg-dev); install them and run make install again")  # fmt: skip
    try:
        lib = ctypes.CDLL(str(LIBRARY))
        lib.jpeg_crop_source.restype = ctypes.c_char_p  # hatch_build.py's digest of the source it compiled
    except (OSError, AttributeError) as e:
        return None, f"{LIBRARY} does not load ({e}); run make install again"
    source = LIBRARY.with_name("jpeg_crop.c")
    if source.exists() and lib.jpeg_crop_source() != hashlib.sha256(source.read_bytes()).hexdigest()[:16].encode():
        return None, f"{LIBRARY.name} was built from an older jpeg_crop.c; run make install again"
    pointer, size, number = ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int
    lib.jpeg_crop_header.argtypes = [pointer, size, ctypes.POINTER(number), pointer]
    lib.jpeg_crop_decode.argtypes = [pointer, size, number, number, number, number, number, ctypes.c_void_p, pointer]
    return lib, ""


_lib, missing = _load()


def available() -> bool:
    return _lib is not None


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def complete(data: bytes) -> bool:
    """Whether the file ends with the end-of-image marker. The crop decoder stops at the crop's last
    row, so it would not see a file cut off below it; such files are decoded whole instead, where
    the cut is found and reported as every other path reports it."""
    return data.rstrip(b"\0\n\r ").endswith(b"\xff\xd9")


def header(data: bytes) -> Header:
    """The JPEG's stored size, whether it decodes to RGB here, and its EXIF orientation. Raises
    OSError with libjpeg's message for a file libjpeg cannot read."""
    fields, message = (ctypes.c_int * 4)(), ctypes.create_string_buffer(MESSAGE_BYTES)
    if _lib.jpeg_crop_header(data, len(data), fields, message):
        raise OSError(message.value.decode(errors="replace"))
    return Header(fields[0], fields[1], bool(fields[2]), fields[3])


def decode(data: bytes, box: tuple[int, int, int, int], reduction: int = 1) -> torch.Tensor:
    """The box (top, left, height, width) of the JPEG decoded at 1/reduction (1, 2, 4 or 8; the
    box in those pixels) as a uint8 (3, height, width) tensor, channels last in memory. Raises
    OSError with libjpeg's message for a corrupt or cut-off file."""
    top, left, height, width = box
    pixels = torch.empty((height, width, 3), dtype=torch.uint8)
    message = ctypes.create_string_buffer(MESSAGE_BYTES)
    if _lib.jpeg_crop_decode(data, len(data), reduction, top, left, height, width, pixels.data_ptr(), message):
        raise OSError(message.value.decode(errors="replace"))
    return pixels.permute(2, 0, 1)
