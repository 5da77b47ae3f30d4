"""``maelab prepare-data SRC OUT``: an image folder as LitData shards for ``data=shards``.

SRC is read as ``data=folder`` reads it (``data/folder.py``: any folder, searched recursively,
labelled by its first-level folders by the ``--labels`` rule). Every file is decoded once, as
training decodes it, so an unreadable one is named now rather than hours into a run; its bytes
are then written unchanged (no re-encoding, no loss) with its label (-1 without labels) and its
name relative to SRC into chunks of about ``--chunk-bytes``: ``OUT/train/`` and ``OUT/val/``
(each a LitData dataset: ``index.json`` + ``chunk-*.bin``), plus ``OUT/maelab.json`` (classes,
counts, source, skipped files). Channels are chosen when training (``data.channels``).

Validation is either a held-out share of SRC (``--val-size``: a fraction or a number of its
readable images, drawn with ``--split-seed`` exactly as ``data=folder`` draws it) or a second folder
(``--val-dir``, e.g. ImageNet's ``val/`` sorted into the same class folders), not both. The
training files are written in an order shuffled with the split seed, so every chunk holds a mix
of classes. OUT is a local or shared folder; copy it to an object store to train from there.
"""

import argparse
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from maelab.errors import UserError

WRITTEN = {"train", "val", "maelab.json"}  # what prepare-data writes into OUT (--overwrite replaces it)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="maelab prepare-data",
        description="Pack an image folder into LitData shards (OUT/train, OUT/val, OUT/maelab.json) for "
        "`maelab train data=shards data.root=OUT`: the files' bytes as they are, with labels and names.",
    )
    parser.add_argument("src", metavar="SRC", help="a folder of images, searched recursively (class folders: labels)")
    parser.add_argument("out", metavar="OUT", help="an empty (or new) folder for the shards")
    parser.add_argument("--labels", choices=("auto", "folders", "none"), default="auto", help="as data.labels")
    parser.add_argument(
        "--val-size", type=float, help="held out of SRC for validation: a fraction or a number of images "
        "(default 0.02; 0 with --val-dir)"
    )  # fmt: skip
    parser.add_argument("--val-dir", help="a second folder as the validation split, in SRC's class folders")
    parser.add_argument("--split-seed", type=int, default=0, help="draws the held-out images and the write order")
    parser.add_argument("--workers", type=int, help="processes that check and write (default: the CPUs)")
    parser.add_argument("--chunk-bytes", default="64MB", help="the size of a chunk (default 64MB)")
    parser.add_argument("--skip-bad-images", action="store_true", help="leave out unreadable files (listed in "
                        "maelab.json) instead of stopping at the first")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace the train/, val/ and maelab.json of OUT")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.val_dir and args.val_size:
        raise UserError("--val-size and --val-dir: choose one (a held-out share of SRC, or a folder)")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers={args.workers}: expected 1 or more (default: the CPUs)")
    src, out = folder(args.src, "SRC"), Path(args.out).expanduser().absolute()
    val_root = folder(args.val_dir, "--val-dir") if args.val_dir else None
    check_out(args.out, out, args.overwrite)
    chunk_bytes = check_chunk_bytes(args.chunk_bytes)
    workers = args.workers or available_workers()
    listed = {"train": images_in(src), **({"val": images_in(val_root)} if val_root else {})}
    classes = classes_of(src, listed["train"], args.labels)
    bad = unreadable([str(path) for files in listed.values() for path in files], workers)
    if bad and not args.skip_bad_images:
        path, why = bad[0]
        more = f" ({len(bad) - 1} more unreadable)" if len(bad) > 1 else ""
        raise UserError(f"{path}: cannot be read as an image ({why}){more}; replace or delete it, or leave such "
                        "files out with --skip-bad-images")  # fmt: skip
    skipped = {path for path, _ in bad}
    readable = {name: [p for p in files if str(p) not in skipped] for name, files in listed.items()}
    splits = split(src, val_root, readable, classes, args)
    random.Random(args.split_seed).shuffle(splits["train"])  # every chunk a mix of classes
    clear(out)  # with --overwrite, once SRC has passed its checks
    for name, files in splits.items():
        write_split(files, out / name, chunk_bytes, workers)
    metadata = describe(args, src, classes, splits, bad)
    from maelab.atomic import write_text_atomically

    write_text_atomically(out / "maelab.json", json.dumps(metadata, indent=2) + "\n")
    counts = metadata["counts"]
    print(f"wrote {out}: train {counts['train']}, val {counts['val']} images", end="")
    print(f" ({len(bad)} unreadable left out, listed in maelab.json)" if bad else "")
    print(f"train on it with: maelab train data=shards data.root={out}")
    return 0


def folder(given: str, what: str) -> Path:
    path = Path(given).expanduser().absolute()
    if not path.is_dir():
        raise UserError(f"{what} {given}: no such folder; give a folder of images")
    return path


def check_out(given: str, out: Path, overwrite: bool) -> None:
    if "://" in given:
        raise UserError(f"OUT {given}: write the shards to a folder, then copy it to the object store "
                        f"(e.g. aws s3 sync OUT {given}) and train with data.root={given}")  # fmt: skip
    if not out.is_dir() or not any(out.iterdir()):
        return
    present = {p.name for p in out.iterdir()}
    if not overwrite:
        raise UserError(f"OUT {out} is not empty; choose a new folder, or --overwrite to replace its shards")
    if present - WRITTEN:
        others = ", ".join(sorted(present - WRITTEN)[:3])
        raise UserError(f"OUT {out} holds files prepare-data did not write ({others}); --overwrite replaces only "
                        "train/, val/ and maelab.json: choose an empty folder")  # fmt: skip


def clear(out: Path) -> None:
    """A previous run's train/, val/ and maelab.json (check_out allowed nothing else there)."""
    for name in WRITTEN:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        elif (out / name).exists():
            (out / name).unlink()


def check_chunk_bytes(value: str) -> str:
    from litdata.utilities.format import _convert_bytes_to_int

    try:
        if _convert_bytes_to_int(value) <= 0:
            raise ValueError("not positive")
    except ValueError:
        raise UserError(f"--chunk-bytes {value}: expected a size such as 64MB, 256MB or 1GB") from None
    return value


def available_workers() -> int:
    from maelab.data.base import available_cpus

    return available_cpus()


def classes_of(src: Path, files: list[Path], rule: str) -> list[str]:
    from maelab.data.folder import folder_labels

    try:
        return folder_labels(src, files, rule)
    except UserError as e:
        raise UserError(str(e).replace("data.labels", "--labels")) from None


def split(src: Path, val_root: Path | None, readable: dict, classes: list[str], args) -> dict[str, list]:
    """{"train": [(path, label, name)], "val": [...]}: the validation folder's files, or a share of
    SRC's readable ones drawn as data=folder draws it."""
    train = labelled_files(src, readable["train"], classes)
    if val_root is not None:
        val = labelled_files(val_root, readable["val"], classes)
        if not train or not val:
            raise UserError(f"{src if not train else val_root}: every image was unreadable and left out "
                            "(--skip-bad-images); give a folder with readable images")  # fmt: skip
        return {"train": train, "val": val}
    from maelab.data.folder import hold_out

    kept, held = hold_out(len(train), held_out(args.val_size), args.split_seed, "--val-size")
    return {"train": [train[i] for i in kept], "val": [train[i] for i in held]}


def held_out(val_size: float | None) -> float | int:
    """--val-size as given: a fraction, or a number of images; 0.02 by default."""
    if val_size is None:
        return 0.02
    return int(val_size) if val_size >= 1 else val_size


def images_in(root: Path) -> list[Path]:
    from maelab.data.files import IMAGE_SUFFIXES
    from maelab.data.folder import list_files, not_images

    files, others = list_files(root)
    if others:
        print(not_images(root, others))
    if not files:
        raise UserError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under it")
    return files


def labelled_files(root: Path, files: list[Path], classes: list[str]) -> list[tuple[str, int, str]]:
    """(path, label, name relative to root); the label is -1 without classes."""
    labelled = []
    for path in files:
        parts = path.relative_to(root).parts
        if classes and (len(parts) < 2 or parts[0] not in classes):
            shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
            raise UserError(f"{path}: not in one of SRC's {len(classes)} class folders ({shown}); sort the "
                            "--val-dir images into them")  # fmt: skip
        labelled.append((str(path), classes.index(parts[0]) if classes else -1, "/".join(parts)))
    return labelled


def why_unreadable(path: str) -> str | None:
    from maelab.data.files import read_rgb

    try:
        read_rgb(Path(path))
    except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for broken or unknown files
        return f"{type(e).__name__}: {e}"
    return None


def unreadable(paths: list[str], workers: int) -> list[tuple[str, str]]:
    """(path, why) of every file that does not decode, as training would decode it."""
    print(f"checking {len(paths)} images with {workers} process(es)")
    if workers <= 1:
        reasons = map(why_unreadable, paths)
    else:
        with ProcessPoolExecutor(workers) as pool:
            reasons = list(pool.map(why_unreadable, paths, chunksize=256))
    return [(path, why) for path, why in zip(paths, reasons) if why is not None]


def sample(item: tuple[str, int, str]) -> dict:
    """One sample of a chunk: the file's bytes as on disk, its label, its name (bytes: LitData
    would read a str naming an existing file as that file)."""
    path, label, name = item
    return {"image": Path(path).read_bytes(), "label": label, "name": os.fsencode(name)}


@contextmanager
def optimizer_sandbox():
    """LitData's optimize sets the process's start method and SIGINT handler for good, and keeps
    its working folders in /tmp/chunks and /tmp/data, where another job's optimize clears them:
    here they live in a temporary folder of this run, and the rest is put back after."""
    previous = multiprocessing.get_start_method(allow_none=True), signal.getsignal(signal.SIGINT)
    names = ("DATA_OPTIMIZER_CACHE_FOLDER", "DATA_OPTIMIZER_DATA_CACHE_FOLDER")
    saved = {name: os.environ.get(name) for name in names}
    with tempfile.TemporaryDirectory(prefix="maelab-prepare-") as tmp:
        os.environ.update({names[0]: f"{tmp}/chunks", names[1]: f"{tmp}/data"})
        try:
            yield
        finally:
            multiprocessing.set_start_method(previous[0], force=True)
            signal.signal(signal.SIGINT, previous[1])
            for name, value in saved.items():
                os.environ.pop(name) if value is None else os.environ.update({name: value})


def write_split(files: list[tuple[str, int, str]], out: Path, chunk_bytes: str, workers: int) -> None:
    import litdata

    print(f"writing {out}: {len(files)} images")
    with optimizer_sandbox():
        litdata.optimize(
            fn=sample,
            inputs=files,
            output_dir=str(out),
            chunk_bytes=chunk_bytes,
            num_workers=min(workers, len(files)),
            reorder_files=False,  # keep the shuffled order
            keep_data_ordered=True,  # each worker writes its slice in order: the same chunks from the same files
            start_method="spawn" if sys.platform == "darwin" else "fork",  # no thread runs yet: no re-imports
            verbose=sys.stdout.isatty(),  # LitData's progress bar (and its chatter) on a terminal only
        )
    chunks = json.loads((out / "index.json").read_text())["chunks"]
    written = sum(chunk["chunk_size"] for chunk in chunks)
    if written != len(files):  # LitData logs a worker's crash but returns
        raise UserError(f"{out}: wrote {written} of {len(files)} images; a writing process failed (see above)")


def describe(args, src: Path, classes: list[str], splits: dict, bad: list) -> dict:
    import litdata

    return {
        "format": "maelab-shards",
        "version": 1,
        "source": str(src),
        "val_source": str(Path(args.val_dir).expanduser().absolute()) if args.val_dir else None,
        "val_size": 0 if args.val_dir else held_out(args.val_size),
        "split_seed": args.split_seed,
        "labels": args.labels,
        "classes": classes,
        "counts": {name: len(files) for name, files in splits.items()},
        "chunk_bytes": args.chunk_bytes,
        "skipped": [{"path": path, "reason": why} for path, why in bad],
        "litdata": litdata.__version__,
    }
