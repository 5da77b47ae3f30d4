"""``maelab bench-data FOLDER``: how many images per second the training input pipeline delivers,
maelab's (each ``data.decode`` path) beside the official MAE pipeline's, as one JSON line.

The official pipeline is main_pretrain.py's: torchvision ``ImageFolder`` (PIL, ``convert('RGB')``)
+ RandomResizedCrop(size, scale=(0.2, 1.0), bicubic) + RandomHorizontalFlip + ToTensor +
Normalize(ImageNet mean, std), float32 batches. maelab's is its training loader: ``ImageFiles``
with per-sample seeds (``sample_rng``), the same crop and flip, uint8 batches (normalised later,
on the device). Every pipeline reads the same files in the same order with the same workers and
batch size, from the page cache (each file is read once before any timing); the first
``--warmup`` batches (worker start-up) are not timed; the pipelines take turns, ``--rounds``
times, and each one's best round is reported. ``img_per_s_per_core`` is img/s / max(1, workers):
the figure to compare at any worker count (with ``--workers 0`` the main process decodes, with
one thread).

``--generate DIR`` first writes ``--count`` ImageNet-like JPEGs into ``DIR/train/<class>/`` and times
that folder, so the comparison runs anywhere: 500 px on the long side for most (one in ten
smaller, one in ten up to 1400 px), quality 90, noisy gradients under flat shapes, no two alike,
about 4.5 bits per pixel like ImageNet's (110 KB for its mean 470 x 390), so decoding costs
what it costs there.
"""

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from maelab.errors import UserError

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLASSES = 10  # of the generated folder
ASPECTS = (4 / 3, 3 / 2, 1.0, 5 / 4, 16 / 9)  # long side / short side


def imagenet_like(rng: np.random.Generator) -> Image.Image:
    """One picture the size and JPEG weight of an ImageNet photo: a colour gradient under noise
    (JPEG's costly part, high frequencies) with a few flat shapes (edges)."""
    kind = rng.random()  # ImageNet's: mostly Flickr's 500 px, some smaller, some larger
    long = 500 if kind < 0.8 else int(rng.integers(200, 500) if kind < 0.9 else rng.integers(600, 1400))
    short = round(long / ASPECTS[rng.integers(len(ASPECTS))])
    w, h = (short, long) if rng.random() < 0.25 else (long, short)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    slope = rng.uniform(-0.4, 0.4, (2, 3)).astype(np.float32)
    pixels = rng.uniform(0, 255, 3).astype(np.float32) + x[..., None] * slope[0] + y[..., None] * slope[1]
    pixels += rng.normal(0, rng.uniform(30, 80), (h, w, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 12)):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        corner = (x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2)))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, *corner), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def generate(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` ImageNet-like JPEGs (quality 90) in ``folder/train/<class>/``; files already
    there are kept."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = folder / "train" / f"n{i % CLASSES:08d}" / f"generated_{i:06d}.JPEG"
        image = imagenet_like(rng)  # drawn even for a kept file: the i-th file is the same in any run
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, format="JPEG", quality=90)


def image_folder(folder: str):
    """torchvision's ImageFolder over ``folder`` (or ``folder/train``), without a transform."""
    from torchvision.datasets import ImageFolder

    root = Path(folder).expanduser()
    root = root / "train" if (root / "train").is_dir() else root
    if not root.is_dir():
        raise UserError(f"{folder}: no such folder; give an ImageFolder tree (root/<class>/*.JPEG) or --generate DIR")
    try:
        return ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as e:  # no class folder, or no image in any
        raise UserError(f"{root}: no images in class folders ({e}); expected {root}/<class>/*.JPEG") from None


def official_transform(size: int):
    """main_pretrain.py's ``transform_train``."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean=MEAN, std=STD),
        ]
    )


def loaders(dataset, order: list[int], workers: int, batch_size: int, size: int) -> dict:
    """One DataLoader factory per pipeline, each over ``order`` (indices into ``dataset.samples``)."""
    from torch.utils.data import DataLoader, Subset

    from maelab.data.files import FileList
    from maelab.data.imagenet import ImageFiles, collate
    from maelab.data.transforms import RandomResizedCropFlip

    common = dict(batch_size=batch_size, num_workers=workers, drop_last=True, pin_memory=torch.cuda.is_available())
    augment = RandomResizedCropFlip(size)
    files = FileList.of(dataset.samples)

    def maelab(transform):
        keys = [(i, 0) for i in order]  # (index, epoch): each sample's crop drawn from its own seed
        maelab_files = ImageFiles(files, transform, seed=0)
        return DataLoader(maelab_files, sampler=keys, collate_fn=partial(collate, keep_size=True), **common)

    def official():
        dataset.transform = official_transform(size)
        return DataLoader(Subset(dataset, order), shuffle=False, **common)

    return {
        "official": official,
        "maelab_pil": lambda: maelab(augment.per_image()),
        "maelab_fast": lambda: maelab(augment.per_file()),
    }


def images_per_second(loader, warmup_batches: int, timed_batches: int) -> float:
    """Images per second over ``timed_batches`` batches, after ``warmup_batches`` untimed ones."""
    batches = iter(loader)
    for _ in range(warmup_batches):
        next(batches)
    start = time.perf_counter()
    images = 0
    for _ in range(timed_batches):
        batch = next(batches)
        if getattr(batch, "bad", None):
            raise UserError(f"{batch.bad[0].path}: cannot be read as an image ({batch.bad[0].reason})")
        images += len(batch.images if hasattr(batch, "images") else batch[0])
    seconds = time.perf_counter() - start
    del batches  # its workers stop
    return images / seconds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maelab bench-data",
        description="Training input pipeline speed, maelab's (each data.decode) beside the official MAE one's: "
        "one JSON line.",
    )
    parser.add_argument("folder", nargs="?", help="an ImageFolder tree: root/<class>/*.JPEG, or root with train/")
    parser.add_argument("--generate", metavar="DIR", help="write --count ImageNet-like JPEGs into DIR, then time it")
    parser.add_argument("--count", type=int, default=1000, help="images --generate writes (default 1000)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (0: the main process)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=1024, help="images timed per pipeline and round")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches first (default 2 per worker)")
    parser.add_argument("--rounds", type=int, default=2, help="turns each pipeline takes; its best is reported")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--decode", default="fast", choices=["pil", "fast"], help="the path of the top-level figures")
    return parser


def check(args) -> None:
    if (args.folder is None) == (args.generate is None):
        raise UserError("maelab bench-data: give a FOLDER or --generate DIR (one of them)")
    for name in ("count", "batch_size", "images", "rounds", "size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be at least 1")
    for name in ("workers", "warmup"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise UserError(f"--{name}={getattr(args, name)}: expected 0 or more")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    check(args)
    if args.generate:
        generate(Path(args.generate), args.count)
    dataset = image_folder(args.generate or args.folder)
    warmup = 2 * max(1, args.workers) if args.warmup is None else args.warmup
    timed = -(-args.images // args.batch_size)  # whole batches
    needed = (warmup + timed) * args.batch_size
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    order = (order * -(-needed // len(order)))[:needed]  # the folder repeated where it is smaller
    for i in sorted(set(order)):
        Path(dataset.samples[i][0]).read_bytes()  # into the page cache, for every pipeline alike
    pipelines = loaders(dataset, order, args.workers, args.batch_size, args.size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # --workers 0: one core; workers run one thread each anyway
    load = os.getloadavg()
    try:
        rounds = {name: [] for name in pipelines}
        for _ in range(args.rounds):
            for name, loader in pipelines.items():
                rounds[name].append(images_per_second(loader(), warmup, timed))
    finally:
        torch.set_num_threads(threads)
    print(json.dumps(report(args, dataset, order, rounds, load, warmup * args.batch_size, timed * args.batch_size)))
    return 0


def header_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def report(args, dataset, order, rounds, load, warmup_images, timed_images) -> dict:
    cores = max(1, args.workers)
    pipelines = {
        name: {
            "img_per_s": round(max(r), 1),
            "img_per_s_per_core": round(max(r) / cores, 1),
            "rounds": [round(x, 1) for x in r],
        }
        for name, r in rounds.items()
    }
    files = [Path(dataset.samples[i][0]) for i in sorted(set(order))]
    sizes = np.array([header_size(f) for f in files])
    official = pipelines["official"]["img_per_s"]
    return {
        "img_per_s": pipelines[f"maelab_{args.decode}"]["img_per_s"],
        "img_per_s_per_core": pipelines[f"maelab_{args.decode}"]["img_per_s_per_core"],
        "decode": args.decode,
        "per_core": "img_per_s / max(1, workers)",
        "pipelines": pipelines,
        "speedup_over_official": {
            n: round(p["img_per_s"] / official, 2) for n, p in pipelines.items() if n != "official"
        },
        "folder": str(Path(dataset.root)),
        "files": len(files),
        "mean_file_kb": round(sum(f.stat().st_size for f in files) / len(files) / 1024, 1),
        "mean_width_height": [round(float(v)) for v in sizes.mean(axis=0)],
        "workers": args.workers,
        "batch_size": args.batch_size,
        "size": args.size,
        "timed_images": timed_images,
        "warmup_images": warmup_images,
        "rounds": args.rounds,
        "load_average_before": [round(x, 2) for x in load],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": len(os.sched_getaffinity(0)),
    }
