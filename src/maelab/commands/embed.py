"""``maelab embed CKPT --images DIR|cifar10|synthetic --out FILE``: the encoder's features of
every image, unmasked: the cls token (what the k-NN monitor and the linear probe read) or the
mean of the patch tokens. Written as one ``.pt`` (a dict) or ``.npz`` with the file names and,
where the images have classes, the labels. ``--knn`` prints the k-NN top-1 (k=20, cosine,
T=0.07, as ``callbacks/knn_monitor.py`` computes it) of a labelled split against the training split."""

import argparse
from pathlib import Path

import torch

from maelab.commands import TRUST_FLAG, add_trust_flag
from maelab.errors import UserError


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
    model = VisionTransformer(**arch)
    load_encoder_state(model, state, f"{ckpt} ({kind})")
    if hf.is_hf_directory(ckpt):
        hf.check_settings(model, settings, ckpt, decoder=False)  # says when its LayerNorm epsilon is not MAE's
    settings = {
        "img_size": hparams.get("img_size", arch["img_size"]),
        "mean": list(hparams.get("mean") or hf.IMAGENET_MEAN),
        "std": list(hparams.get("std") or hf.IMAGENET_STD),
    }
    return model.eval(), settings


def folder_images(folder: Path, size: int, skip_bad: bool):
    """(uint8 images, names, labels or None, class names): every image under ``folder``
    (recursively, sorted), resized (short side) and center-cropped to ``size``; class folders,
    where every image sits in one, label them."""
    from torchvision import transforms as T

    from maelab.data.files import IMAGE_SUFFIXES, read_rgb

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise UserError(f"--images {folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under it")
    classes = sorted({p.relative_to(folder).parts[0] for p in files if len(p.relative_to(folder).parts) > 1})
    labelled = classes and all(len(p.relative_to(folder).parts) > 1 for p in files)
    view = T.Compose([T.Resize(size, T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.PILToTensor()])
    images, names, labels, skipped = [], [], [], []
    for path in progress(files, "reading"):
        try:
            images.append(view(read_rgb(path)))
        except Exception as e:  # noqa: BLE001  (PIL reports a bad file in many types)
            if not skip_bad:
                raise UserError(f"{path}: unreadable ({e}); --skip-bad-images leaves such files out") from None
            skipped.append(path)
            continue
        names.append(str(path.relative_to(folder)))
        labels.append(classes.index(path.relative_to(folder).parts[0]) if labelled else -1)
    if skipped:
        print(f"skipped {len(skipped)} unreadable files, e.g. {skipped[0]}")
    if not images:
        raise UserError(f"--images {folder}: none of its {len(files)} image files is readable")
    return torch.stack(images), names, torch.tensor(labels) if labelled else None, classes if labelled else None


def split_images(source: str, split: str, size: int):
    """(uint8 images, names, labels) of CIFAR-10's or the synthetic shapes' ``split`` (train or
    test), read by their datamodules (``conf/data/``'s defaults: 32 px shapes, data.seed 0)."""
    import os

    from maelab.data.cifar10 import CIFAR10DataModule
    from maelab.data.synthetic import SyntheticDataModule

    common = dict(img_size=32, num_classes=10, batch_size=1, mean=[0.5] * 3, std=[0.5] * 3)  # mean, std: unused
    if source == "synthetic":
        dm = SyntheticDataModule(**common)
    else:
        dm = CIFAR10DataModule(root=os.environ.get("MAELAB_CIFAR10", "data/cifar10"), download=False, **common)
    images, labels = dm.load_split(split)
    return images, [f"{source}/{split}/{i}" for i in range(len(images))], labels


def progress(items, what: str):
    from tqdm import tqdm

    # disable=None: drawn on a terminal, silent in a batch job's log
    return tqdm(items, desc=what, unit="img" if what == "reading" else "batch", leave=False, disable=None)


@torch.no_grad()
def embed(model, settings: dict, images: torch.Tensor, pool: str, batch_size: int, device: torch.device):
    """(N, D) float features of uint8 images, in batches on ``device``."""
    from maelab.data.transforms import model_input

    model.to(device)
    out = []
    for start in progress(range(0, len(images), batch_size), "embedding"):
        x = model_input(images[start : start + batch_size].to(device), settings["mean"], settings["std"],
                        settings["img_size"])  # fmt: skip
        tokens = model.forward_features(x)
        out.append((tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)).float().cpu())
    return torch.cat(out)


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="maelab embed",
        description="Features of every image from a checkpoint's encoder, unmasked: cls token or mean of patch "
        "tokens, written with file names and labels; --knn prints the k-NN top-1 (k=20) as the monitor does.",
    )
    p.add_argument("ckpt", help="a maelab checkpoint (pretraining or classifier) or an official MAE .pth")
    p.add_argument("--images", required=True, help="a folder of images (class folders: labels), cifar10 or synthetic")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="cifar10, synthetic (train, test), or with --knn a folder's DIR/<split>/")  # fmt: skip
    p.add_argument("--out", required=True, help="FILE.pt or FILE.npz")
    p.add_argument("--pool", default="cls", choices=("cls", "mean"), help="cls token, or mean of the patch tokens")
    p.add_argument("--batch-size", type=int, default=256)
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
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, settings = load_encoder(args.ckpt, args.trust_checkpoint_code, args.num_heads)
    images, names, labels, classes = images_of(args, args.split, settings["img_size"])
    features = embed(model, settings, images, args.pool, args.batch_size, device)
    save(Path(args.out), features, names, labels, args.pool, args.ckpt)
    print(f"wrote {args.out}: {len(names)} x {features.shape[1]} features ({args.pool})"
          + ("" if labels is None else f", labels of {int(labels.max()) + 1} classes"))  # fmt: skip
    if args.knn:
        from maelab.callbacks.knn_monitor import knn_accuracy

        bank_images, _, bank_labels, bank_classes = images_of(args, "train", settings["img_size"])
        if bank_classes != classes:
            raise UserError(
                f"--knn: the train split's classes {bank_classes} differ from --split {args.split}'s {classes}"
            )
        bank = embed(model, settings, bank_images, args.pool, args.batch_size, device)
        top1 = knn_accuracy(bank, bank_labels, features, labels, num_classes=int(bank_labels.max()) + 1, k=20)
        print(f"k-NN top-1 (k=20, {args.split} against train): {top1:.4f}")
    return 0


def images_of(args, split: str, size: int):
    """(uint8 images, names, labels, class names) of ``--images``: a named dataset's split; a
    folder whole, or with ``--knn`` its ``split/`` folder, which must have class folders."""
    if args.images in ("cifar10", "synthetic"):
        if split == "val":
            raise UserError(f"--split val: {args.images} has a train and a test split")
        images, names, labels = split_images(args.images, split, size)
        return images, names, labels, list(range(10))
    folder = Path(args.images) / split if args.knn else Path(args.images)
    if not folder.is_dir():
        raise UserError(f"--images {args.images}: " + (f"--knn votes with train/ against {split}/, and {folder} is "
                        "missing" if args.knn else "neither a folder nor one of: cifar10, synthetic"))  # fmt: skip
    images, names, labels, classes = folder_images(folder, size, args.skip_bad_images)
    if args.knn and labels is None:
        raise UserError(f"--knn: {folder} has no class folders (<class>/image) to label its images")
    return images, names, labels, classes
