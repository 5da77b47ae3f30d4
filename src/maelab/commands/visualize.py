"""``maelab visualize``: what a pretrained MAE reconstructs (the paper's Fig. 2 and 4), or with
``--attention`` where its encoder looks (the figure DINO and MAE papers draw).

One row per image: for each mask ratio and masking strategy asked for, the masked input and the
reconstruction (visible patches pasted back), then the original. With ``--attention``: the
original, then the last block's cls-to-patch attention averaged over heads and per head,
upsampled over the image. Column titles sit on top.
"""

import argparse
import os
from pathlib import Path

import torch
from torchvision.utils import make_grid

from maelab.atomic import write_atomically
from maelab.commands import TRUST_FLAG, add_trust_flag
from maelab.errors import UserError

TITLE_HEIGHT = 14
MASKINGS = {  # --masking choices; "model" keeps the checkpoint's own strategy
    "random": "maelab.models.masking.RandomMasking",
    "block": "maelab.models.masking.BlockMasking",
    "grid": "maelab.models.masking.GridMasking",
}


def load_pretrain_module(ckpt: str, trust: bool = False):
    """A maelab pretraining checkpoint (``last.ckpt``) as a PretrainModule on the CPU, eval mode,
    read as weights only unless ``trust`` (``--trust-checkpoint-code``)."""
    from maelab.modules.pretrain import PretrainModule
    from maelab.weights.hf import is_hf_directory
    from maelab.weights.loading import load_user_file

    if is_hf_directory(ckpt):
        return hf_pretrain_module(ckpt, trust)
    expected = "a maelab pretraining checkpoint (<run>/checkpoints/last.ckpt) or a Hugging Face ViTMAEForPreTraining"
    state = load_user_file(ckpt, trust=trust, setting=TRUST_FLAG, expected=expected)
    hparams = state.get("hyper_parameters", {}) if isinstance(state, dict) else {}
    if hparams.get("target") is None or "state_dict" not in state:
        raise UserError(f"{ckpt}: not a maelab pretraining checkpoint (no hyper-parameters with a target)")
    module = PretrainModule(**hparams)
    module.load_state_dict(state["state_dict"])
    return module.eval()


def hf_pretrain_module(folder: str, trust: bool):
    """A Hugging Face ViTMAEForPreTraining folder as a PretrainModule of its own settings."""
    from maelab.modules.pretrain import PretrainModule
    from maelab.weights.hf import read_config, read_preprocessing, settings_of
    from maelab.weights.pretrained import load_full

    settings = settings_of(read_config(Path(folder)))
    if "decoder_width" not in settings:
        raise UserError(f"{folder}: a ViT without MAE's decoder reconstructs nothing; draw it with --attention")
    target = "NormPixelTarget" if settings["norm_pix_loss"] else "PixelTarget"
    module = PretrainModule(
        model={k: settings[k] for k in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")},
        target={"_target_": f"maelab.models.targets.{target}"},
        masking={"_target_": "maelab.models.masking.RandomMasking"},
        augment=None,
        img_size=settings["img_size"],
        mask_ratio=settings["mask_ratio"],
        **{k: settings[k] for k in ("decoder_width", "decoder_depth", "decoder_heads")},
        **read_preprocessing(folder),
    )
    load_full(module.model, folder, trust)
    return module.eval()


def load_images(source: str, n: int, size: int) -> torch.Tensor:
    """n uint8 images (n, 3, size, size): evenly spaced through a folder of image files (searched
    recursively, sorted), CIFAR-10's test split (``cifar10``), or synthetic shapes (``synthetic``)."""
    if source == "synthetic":
        from maelab.data.synthetic import make_shapes

        return make_shapes(n, size, 10, seed=0)[0]
    if source == "cifar10":
        from maelab.data.cifar10 import CIFAR10DataModule

        root = os.environ.get("MAELAB_CIFAR10", "data/cifar10")
        dm = CIFAR10DataModule(  # mean and std do not touch the uint8 images it hands out
            root=root, download=False, img_size=size, num_classes=10, batch_size=1, mean=[0.5] * 3, std=[0.5] * 3
        )
        return dm.preview_images(n, split="test")[0]
    folder = Path(source)
    if not folder.is_dir():
        raise UserError(f"--images {source}: neither a folder of images nor one of: cifar10, synthetic")
    from torchvision import transforms as T

    from maelab.data.files import IMAGE_SUFFIXES, read_rgb

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--images {source}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under it")
    pick = torch.linspace(0, len(files) - 1, min(n, len(files))).long().tolist()
    view = T.Compose([T.Resize(size, T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.PILToTensor()])
    return torch.stack([view(read_rgb(files[i])) for i in pick])


def figure(module, images: torch.Tensor, mask_ratios: list[float], maskings: list[str], seed: int = 0, scale: int = 1):
    """(3, H, W) in [0, 1] and the column titles: masked | reconstruction per setting, then original."""
    from hydra.utils import instantiate

    from maelab.callbacks.reconstructions import reconstruct

    if not module.model.target.in_pixel_space:
        raise UserError(
            f"the checkpoint's target {type(module.model.target).__name__} is not pixels: there is no "
            "reconstruction to draw (pixel, norm_pixel and pca are)"
        )
    columns, titles = [], []
    for name in maskings:
        strategy = instantiate({"_target_": MASKINGS[name]}) if name != "model" else None
        for ratio in mask_ratios:
            masked, reconstruction, original = reconstruct(module, images, ratio, strategy, seed)
            columns += [masked, reconstruction]
            label = f"{round(ratio * 100)}%" + ("" if name == "model" else f" {name}")
            titles += [f"masked {label}", "reconstruction"]
    columns.append(original)
    titles.append("original")
    cells = torch.stack(columns, dim=1).flatten(0, 1)  # row by row
    if scale > 1:
        cells = torch.nn.functional.interpolate(cells, scale_factor=scale, mode="nearest")
    return make_grid(cells, nrow=len(columns), padding=2, pad_value=1.0), titles


@torch.no_grad()
def cls_attention(model, x: torch.Tensor) -> torch.Tensor:
    """(N, heads, L): the last block's attention of the cls token to each patch, softmaxed over
    all tokens as the block computes it. timm's attention computes the probabilities itself on
    its explicit (unfused) path; they are read there, not computed again."""
    attn = model.blocks[-1].attn
    captured = []
    handle = attn.attn_drop.register_forward_hook(lambda module, args, out: captured.append(out))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        model.forward_features(x)
    finally:
        attn.fused_attn = fused
        handle.remove()
    return captured[0][:, :, 0, 1:]


def attention_figure(model, settings: dict, images: torch.Tensor, scale: int = 1):
    """(3, H, W) in [0, 1] and the column titles: the original, then the cls-to-patch attention
    averaged over heads and per head, each map upsampled over the image and drawn on it."""
    from matplotlib import colormaps

    from maelab.data.transforms import model_input

    size = settings["img_size"]
    x = model_input(images, settings["mean"], settings["std"], size)
    attention = cls_attention(model, x)  # (N, heads, L)
    grid = round(attention.shape[-1] ** 0.5)
    maps = torch.cat([attention.mean(dim=1, keepdim=True), attention], dim=1).unflatten(-1, (grid, grid))
    maps = torch.nn.functional.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
    low, high = maps.amin(dim=(-2, -1), keepdim=True), maps.amax(dim=(-2, -1), keepdim=True)
    heat = torch.from_numpy(colormaps["inferno"](((maps - low) / (high - low + 1e-12)).numpy())[..., :3]).float()
    shown = torch.nn.functional.interpolate(images.float() / 255, size=(size, size), mode="bilinear")
    gray = (shown * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)  # the scene, not
    overlays = 0.3 * gray.unsqueeze(1) + 0.7 * heat.permute(0, 1, 4, 2, 3)  # its colours (N, 1 + heads, 3, S, S)
    cells = torch.cat([shown.unsqueeze(1), overlays], dim=1)
    titles = ["original", "mean of heads"] + [f"head {h + 1}" for h in range(attention.shape[1])]
    cells = cells.flatten(0, 1)
    if scale > 1:
        cells = torch.nn.functional.interpolate(cells, scale_factor=scale, mode="nearest")
    return make_grid(cells.clamp(0, 1), nrow=len(titles), padding=2, pad_value=1.0), titles


def save_with_titles(grid: torch.Tensor, titles: list[str], out: str) -> None:
    """The grid as a PNG with each column's title above it."""
    from PIL import Image, ImageDraw

    array = (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    body = Image.fromarray(array)
    canvas = Image.new("RGB", (body.width, body.height + TITLE_HEIGHT), "white")
    canvas.paste(body, (0, TITLE_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    width = (body.width - 2) / len(titles)
    for i, title in enumerate(titles):
        draw.text((2 + i * width + 2, 1), title, fill="black")
    write_atomically(out, lambda f: canvas.save(f, format="PNG"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="maelab visualize",
        description="Draw what a pretrained MAE reconstructs: masked input and reconstruction for each mask "
        "ratio and masking strategy, then the original, one row per image.",
    )
    parser.add_argument(
        "ckpt",
        help="a maelab pretraining checkpoint (<run>/checkpoints/last.ckpt) or a Hugging Face ViTMAEForPreTraining "
        "folder; with --attention also a classifier, an official MAE .pth or a ViTMAEModel / ViT folder",
    )
    parser.add_argument("--images", default="synthetic", help="a folder of images, or cifar10, or synthetic")
    parser.add_argument("--num-images", type=int, default=6)
    parser.add_argument("--mask-ratio", type=float, nargs="+", default=[0.75], help="e.g. 0.75 0.85 0.95")
    parser.add_argument(
        "--masking", nargs="+", default=["model"], choices=["model", *MASKINGS], help="default: the checkpoint's own"
    )
    parser.add_argument("--seed", type=int, default=0, help="the masks drawn")
    parser.add_argument("--scale", type=int, default=0, help="enlarge each image this many times; 0: to >= 96 px")
    parser.add_argument("--out", help="the PNG to write; default: reconstructions.png, or attention.png")
    parser.add_argument(
        "--attention",
        action="store_true",
        help="draw the last block's cls-to-patch attention per head and averaged instead (any maelab or official "
        "checkpoint)",
    )
    parser.add_argument("--num-heads", type=int, help="--attention: for official files of an unnamed ViT width")
    add_trust_flag(parser)
    args = parser.parse_args(argv)
    if args.attention:
        return draw_attention(args)
    module = load_pretrain_module(args.ckpt, args.trust_checkpoint_code)
    images = load_images(args.images, args.num_images, module.img_size)
    scale = args.scale or -(-96 // module.img_size)
    try:
        grid, titles = figure(module, images, args.mask_ratio, args.masking, args.seed, scale)
    except ValueError as e:  # the model refuses a mask ratio that leaves nothing visible
        raise UserError(f"--mask-ratio: {e}") from None
    out = args.out or "reconstructions.png"
    save_with_titles(grid, titles, out)
    print(f"wrote {out}: {len(images)} images x {len(titles)} columns ({', '.join(titles)})")
    return 0


def draw_attention(args) -> int:
    from maelab.commands.embed import load_encoder

    model, settings = load_encoder(args.ckpt, args.trust_checkpoint_code, args.num_heads)
    images = load_images(args.images, args.num_images, settings["img_size"])
    grid, titles = attention_figure(model, settings, images, args.scale or -(-96 // settings["img_size"]))
    out = args.out or "attention.png"
    save_with_titles(grid, titles, out)
    print(
        f"wrote {out}: {len(images)} images x {len(titles)} columns (original, mean of heads, {len(titles) - 2} heads)"
    )
    return 0
