"""``maelab embed CKPT --images DIR|cifar10|synthetic|imagenet --out FILE``: the encoder's features of
every image, unmasked: the cls token (what the k-NN monitor and the linear probe read) or the
mean of the patch tokens. Written as one ``.pt`` (a dict) or ``.npz`` with the file names and,
where the images have classes, the labels. ``--knn`` prints the k-NN top-1 (k=20, cosine,
T=0.07, as ``callbacks/knn_monitor.py`` computes it) of a labelled split against the training split."""

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from maelab.commands import TRUST_FLAG, add_trust_flag
from maelab.errors import UserError


@dataclass
class Images:
    """What ``--images`` names: uint8 batches (with each image's index into ``names``), as read."""

    batches: object  # an iterable of (uint8 batch, indices)
    names: list[str]
    labels: torch.Tensor | None
    classes: list | None


def load_encoder(ckpt: str, trust: bool, num_heads: int | None = None):
    """(ViT encoder in eval mode, its input settings) from a maelab .ckpt, an official MAE .pth
    or a Hugging Face ViTMAE / ViT folder."""
    from maelab.models.vit import VisionTransformer
    from maelab.weights import hf
    from maelab.weights.loading import load_user_file
    from maelab.weights.pretrained import load_encoder_state, state_dict_of
    from maelab.weights.timm import architecture

    if hf.is_hf_directory(ckpt):
        state, settings, kind = hf.read_hf_directory(ckpt, trust, TRUST_FLAG)
        hparams = {"model": {"num_heads": settings["num_heads"]}, **hf.read_preprocessing(ckpt)}
    else:
        raw = load_user_file(ckpt, trust=trust, setting=TRUST_FLAG)
        state, kind = state_dict_of(raw, ckpt)
        hparams = dict(raw.get("hyper_parameters") or {}) if isinstance(raw, dict) else {}
    if "cls_token" not in state:
        raise UserError(f"{ckpt} ({kind}) has no ViT encoder: cls_token is missing")
    arch = architecture(state, hparams, num_heads)
    if "norm.weight" in state:
        model = VisionTransformer(**arch)
        load_encoder_state(model, state, f"{ckpt} ({kind})")
    else:
        model = average_pooled_classifier(state, arch)
    if hf.is_hf_directory(ckpt):
        hf.check_settings(model, settings, ckpt, decoder=False)  # says when its LayerNorm epsilon is not MAE's
    settings = {
        "img_size": hparams.get("img_size", arch["img_size"]),
        "mean": list(hparams.get("mean") or hf.IMAGENET_MEAN),
        "std": list(hparams.get("std") or hf.IMAGENET_STD),
    }
    return model.eval(), settings


def average_pooled_classifier(state: dict, arch: dict):
    """A classifier pooled by average (its LayerNorm after the pooling, no final ``norm``), whole:
    its features are the normalised mean of its patch tokens."""
    from maelab.models.classifier import ViTClassifier

    probe = "head.1.weight" in state
    num_classes = state["head.1.weight" if probe else "head.weight"].shape[0]
    model = ViTClassifier(num_classes, global_pool="avg", head_batchnorm=probe, **arch)
    model.load_state_dict({k: state[k] for k in model.state_dict()})
    return model


def pooled(model, x: torch.Tensor, pool: str) -> torch.Tensor:
    if getattr(model, "global_pool", None) == "avg":
        return model.features(x)  # the classifier's own: fc_norm(mean of patch tokens)
    tokens = model.forward_features(x)
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)


class FileImages(torch.utils.data.Dataset):
    """Files read, resized (short side) and center-cropped in DataLoader workers; an unreadable
    file comes back as its error, for the main process to name or skip."""

    def __init__(self, files: list[Path], size: int):
        from torchvision import transforms as T

        self.files = files
        self.view = T.Compose([T.Resize(size, T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.PILToTensor()])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from maelab.data.files import read_rgb

        try:
            return i, self.view(read_rgb(self.files[i]))
        except Exception as e:  # noqa: BLE001  (PIL reports a bad file in many types)
            return i, f"{type(e).__name__}: {e}"


def folder_images(folder: Path, size: int, skip_bad: bool, batch_size: int, workers: int) -> Images:
    """Every image under ``folder`` (recursively, sorted), streamed in batches (a folder may not fit
    in memory); class folders, where every image sits in one, label them."""
    from maelab.data.files import IMAGE_SUFFIXES

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise UserError(f"--images {folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under it")
    parts = [p.relative_to(folder).parts for p in files]
    classes = sorted({q[0] for q in parts if len(q) > 1})
    labelled = bool(classes) and all(len(q) > 1 for q in parts)
    labels = torch.tensor([classes.index(q[0]) for q in parts]) if labelled else None
    loader = torch.utils.data.DataLoader(
        FileImages(files, size), batch_size, num_workers=workers, collate_fn=list, persistent_workers=False
    )

    def batches():
        skipped = []
        for items in loader:
            good = [(i, image) for i, image in items if isinstance(image, torch.Tensor)]
            for i, error in (item for item in items if not isinstance(item[1], torch.Tensor)):
                if not skip_bad:
                    raise UserError(f"{files[i]}: unreadable ({error}); --skip-bad-images leaves such files out")
                skipped.append(files[i])
            if good:
                yield torch.stack([image for _, image in good]), [i for i, _ in good]
        if skipped:
            print(f"skipped {len(skipped)} unreadable files, e.g. {skipped[0]}")

    names = [str(p.relative_to(folder)) for p in files]
    return Images(batches(), names, labels, classes if labelled else None)


def split_images(source: str, split: str, size: int):
    """(uint8 images, names, labels) of CIFAR-10's or the synthetic shapes' ``split`` (train or
    test), read by their datamodules (``conf/data/``'s defaults: 32 px shapes, data.seed 0)."""
    from maelab.data.cifar10 import CIFAR10DataModule
    from maelab.data.synthetic import SyntheticDataModule

    common = dict(img_size=32, num_classes=10, batch_size=1, mean=[0.5] * 3, std=[0.5] * 3)  # mean, std: unused
    if source == "synthetic":
        dm = SyntheticDataModule(**common)
    else:
        dm = CIFAR10DataModule(root=os.environ.get("MAELAB_CIFAR10", "data/cifar10"), download=False, **common)
    images, labels = dm.load_split(split)
    return images, [f"{source}/{split}/{i}" for i in range(len(images))], labels


@torch.no_grad()
def embed(model, settings: dict, images: Images, pool: str, device: torch.device) -> tuple[torch.Tensor, Images]:
    """(N, D) float features of the images read, in batches on ``device``, and the images' names
    and labels less those left out (``--skip-bad-images``)."""
    from tqdm import tqdm

    from maelab.data.transforms import model_input

    model.to(device)
    out, kept = [], []
    # disable=None: drawn on a terminal, silent in a batch job's log
    with tqdm(total=len(images.names), desc="embedding", unit="img", leave=False, disable=None) as bar:
        for batch, indices in images.batches:
            x = model_input(batch.to(device), settings["mean"], settings["std"], settings["img_size"])
            out.append(pooled(model, x, pool).float().cpu())
            kept += indices
            bar.update(len(batch))
    if not kept:
        raise UserError(f"--images: none of its {len(images.names)} image files is readable")
    labels = None if images.labels is None else images.labels[kept]
    return torch.cat(out), Images([], [images.names[i] for i in kept], labels, images.classes)


def save(out: Path, features: torch.Tensor, names: list[str], labels, pool: str, ckpt: str) -> None:
    from maelab.atomic import write_atomically

    if out.suffix == ".pt":
        data = {"features": features, "names": names, "labels": labels, "pool": pool, "checkpoint": ckpt}
        write_atomically(out, lambda f: torch.save(data, f))
    elif out.suffix == ".npz":
        import numpy as np

        arrays = {"features": features.numpy(), "names": np.array(names)}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        write_atomically(out, lambda f: np.savez(f, **arrays))
    else:
        raise UserError(f"--out {out}: expected a .pt (a dict: features, names, labels) or .npz file")


NAMED = ("cifar10", "synthetic", "imagenet")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="maelab embed",
        description="Features of every image from a checkpoint's encoder, unmasked: cls token or mean of patch "
        "tokens, written with file names and labels; --knn prints the k-NN top-1 (k=20) as the monitor does.",
    )
    p.add_argument(
        "ckpt", help="a maelab checkpoint (<run>/checkpoints/last.ckpt), an official MAE .pth or a Hugging Face folder"
    )
    p.add_argument("--images", required=True, help="a folder of images (class folders: labels), cifar10, "
                   "synthetic, or imagenet ($MAELAB_IMAGENET, else data/imagenet)")  # fmt: skip
    p.add_argument("--split", choices=("train", "val", "test"),
                   help="default: test for cifar10 and synthetic, val for imagenet; a folder: all of it, or with "
                   "--knn DIR/test/")  # fmt: skip
    p.add_argument("--out", required=True, help="FILE.pt or FILE.npz")
    p.add_argument("--pool", choices=("cls", "mean"), help="the cls token (default), or the mean of the patch tokens "
                   "(the default of a classifier that pools by average, normalised as it classifies)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, help="processes reading a folder's files; default: the CPUs less one, <= 8")
    p.add_argument("--knn", action="store_true", help="k-NN top-1 of --split against the train split (DIR/train/)")
    p.add_argument("--skip-bad-images", action="store_true", help="leave unreadable files out (counted), not stop")
    p.add_argument("--device", help="default: cuda when present, else cpu")
    p.add_argument("--num-heads", type=int, help="for official files of a width other than the named ViT sizes")
    add_trust_flag(p)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: expected a positive number of images")
    args.split = args.split or ("val" if args.images == "imagenet" else "test")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, settings = load_encoder(args.ckpt, args.trust_checkpoint_code, args.num_heads)
    averaged = getattr(model, "global_pool", None) == "avg"
    if averaged and args.pool == "cls":
        raise UserError(f"--pool cls: {args.ckpt} classifies the mean of its patch tokens (its cls token trained for "
                        "nothing); leave out --pool for the features it classifies")  # fmt: skip
    args.pool = args.pool or ("mean" if averaged else "cls")
    features, images = embed(model, settings, images_of(args, args.split, settings["img_size"]), args.pool, device)
    save(Path(args.out), features, images.names, images.labels, args.pool, args.ckpt)
    print(f"wrote {args.out}: {len(images.names)} x {features.shape[1]} features ({args.pool})"
          + ("" if images.labels is None else f", labels of {len(images.classes)} classes"))  # fmt: skip
    if args.knn:
        from maelab.callbacks.knn_monitor import knn_accuracy

        bank, train = embed(model, settings, images_of(args, "train", settings["img_size"]), args.pool, device)
        if train.classes != images.classes:
            raise UserError(
                f"--knn: the train split's classes {train.classes} differ from --split {args.split}'s {images.classes}"
            )
        top1 = knn_accuracy(bank, train.labels, features, images.labels, num_classes=len(train.classes), k=20)
        print(f"k-NN top-1 (k=20, {args.split} against train): {top1:.4f}")
    return 0


def images_of(args, split: str, size: int) -> Images:
    """A named dataset's split; a folder whole, or with ``--knn`` its ``split/`` folder, which
    must have class folders; imagenet is a folder of train/ and val/."""
    if args.images in ("cifar10", "synthetic"):
        if split == "val":
            raise UserError(f"--split val: {args.images} has a train and a test split")
        images, names, labels = split_images(args.images, split, size)
        chunks = [(images[i : i + args.batch_size], list(range(i, min(i + args.batch_size, len(images)))))
                  for i in range(0, len(images), args.batch_size)]  # fmt: skip
        return Images(chunks, names, labels, list(range(10)))
    if args.images == "imagenet":
        root = Path(os.environ.get("MAELAB_IMAGENET", "data/imagenet"))
        if split == "test" or not (root / split).is_dir():
            raise UserError(f"--images imagenet: {root / split} is not a folder; ImageNet has train/ and val/ "
                            "under $MAELAB_IMAGENET (else data/imagenet)")  # fmt: skip
        folder = root / split
    else:
        folder = Path(args.images) / split if args.knn else Path(args.images)
    if not folder.is_dir():
        raise UserError(f"--images {args.images}: " + (f"--knn votes with train/ against {split}/, and {folder} is "
                        f"missing" if args.knn else f"neither a folder nor one of: {', '.join(NAMED)}"))  # fmt: skip
    workers = args.workers if args.workers is not None else min(8, max(0, (os.cpu_count() or 1) - 1))
    images = folder_images(folder, size, args.skip_bad_images, args.batch_size, workers)
    if (args.knn or args.images == "imagenet") and images.labels is None:
        why = "--knn" if args.knn else "--images imagenet"
        raise UserError(f"{why}: {folder} has no class folders (<class>/image) to label its images")
    return images
