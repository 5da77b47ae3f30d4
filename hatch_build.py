"""Builds the JPEG crop decoder of ``data.decode=fast`` (``src/maelab/data/jpeg_crop.c``) into the
shared library that ``maelab.data.jpeg_crop`` loads with ctypes, when maelab is installed.

It needs a C compiler and libjpeg(-turbo)'s headers (Debian and Ubuntu: ``libjpeg-dev``; conda:
``libjpeg-turbo``, found through ``$CONDA_PREFIX``); ``$CC``, ``$CFLAGS`` and ``$LDFLAGS`` are
honoured. Without them the install goes on without the library and the fast path decodes whole
JPEGs, about a fifth slower; a run says so in its log.
"""

import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = "src/maelab/data/jpeg_crop.c"
LIBRARY = "maelab/data/_jpeg_crop.so"


def compile_library(source: Path, target: Path) -> str:
    """Compiles source into target (replaced whole, so a running process keeps the old one); returns
    the compiler's complaint, or an empty string."""
    prefix = [f"-I{os.environ['CONDA_PREFIX']}/include"] if os.environ.get("CONDA_PREFIX") else []
    libraries = (
        [f"-L{os.environ['CONDA_PREFIX']}/lib", f"-Wl,-rpath,{os.environ['CONDA_PREFIX']}/lib"] if prefix else []
    )
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]  # jpeg_crop.py checks it at load
    command = [
        *shlex.split(os.environ.get("CC", "cc")),
        *shlex.split(os.environ.get("CFLAGS", "")),
        *prefix,
        f'-DJPEG_CROP_SOURCE="{digest}"',
        "-O2", "-fPIC", "-shared", str(source), "-o", str(partial),
        *shlex.split(os.environ.get("LDFLAGS", "")),
        *libraries,
        "-ljpeg",
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:  # no compiler at all
        return str(e)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        return done.stderr.strip() or f"{command[0]} exited with {done.returncode}"
    partial.replace(target)
    return ""


class JpegCropBuild(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        root = Path(self.root)
        if version == "editable":  # the package is imported from src/: the library goes beside its loader
            target = root / "src" / LIBRARY
        else:
            self._scratch = tempfile.TemporaryDirectory()
            target = Path(self._scratch.name) / Path(LIBRARY).name
        complaint = compile_library(root / SOURCE, target)
        if complaint:
            print(f"maelab: the JPEG crop decoder was not built; data.decode=fast decodes whole JPEGs.\n{complaint}",
                  file=sys.stderr)  # fmt: skip
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":
            build_data["force_include"][str(target)] = LIBRARY

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:
        if getattr(self, "_scratch", None) is not None:
            self._scratch.cleanup()
