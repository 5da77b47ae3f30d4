"""``maelab export CKPT OUT``: a checkpoint's weights for another library. ``--format timm``
(the default): the encoder (and head) as a timm ``VisionTransformer`` state dict plus ``OUT.json``
with the ``timm.create_model`` arguments (``weights/timm.py``). ``--format hf``: a Hugging Face
model folder (``weights/hf_export.py``)."""

from maelab.commands import add_trust_flag


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="maelab export",
        description="Write a maelab .ckpt or an official MAE .pth for timm (the encoder and head as a "
        "VisionTransformer state dict, with OUT.json holding the timm.create_model arguments) or for Hugging "
        "Face transformers (a folder: ViTMAEForPreTraining for a pretraining checkpoint, ViTForImageClassification "
        "for a classifier).",
    )
    parser.add_argument("ckpt", help="a maelab checkpoint (last.ckpt) or an official MAE .pth")
    parser.add_argument("out", help="timm: the state dict to write (vit_t_cifar10.pth); hf: the folder to write")
    parser.add_argument("--format", choices=("timm", "hf"), default="timm", help="default: timm")
    parser.add_argument("--global-pool", choices=("avg", "token"), help="timm: default its own, else token")
    parser.add_argument(
        "--encoder-only", action="store_true", help="hf: the encoder alone as a ViTMAEModel (no decoder, no head)"
    )
    parser.add_argument("--num-heads", type=int, help="for official files of a width other than the named sizes")
    add_trust_flag(parser)
    args = parser.parse_args(argv)
    if args.format == "hf":
        return export_hf(args)
    if args.encoder_only:
        parser.error("--encoder-only is for --format hf; a timm export of a pretraining checkpoint is its encoder")
    from maelab.weights.timm import export

    meta = export(args.ckpt, args.out, args.global_pool, args.num_heads, trust=args.trust_checkpoint_code)
    kwargs = ", ".join(f"{k}={v!r}" for k, v in meta["kwargs"].items())
    if meta["kwargs"]["global_pool"] == "avg" and meta["kwargs"]["num_classes"] == 0:
        print("note: fc_norm (after pooling) takes the encoder's final norm: a start for fine-tuning")
    print(f"wrote {args.out}; load it with:")
    print(f"  model = timm.create_model({meta['timm_model']!r}, pretrained=False, {kwargs})")
    print(f"  model.load_state_dict(torch.load({args.out!r}))")
    return 0


def export_hf(args) -> int:
    from maelab.errors import UserError
    from maelab.weights.hf_export import export_hf as write_hf

    if args.global_pool:
        raise UserError("--global-pool is for --format timm; a Hugging Face folder keeps the checkpoint's pooling")
    meta = write_hf(args.ckpt, args.out, args.encoder_only, args.num_heads, trust=args.trust_checkpoint_code)
    loader = "AutoModelForImageClassification" if meta["class"].startswith("Timm") else meta["class"]
    print(f"wrote {args.out}/ ({', '.join(meta['files'])}), a {meta['class']}; load it with:")
    print(f"  from transformers import {loader}")
    print(f"  model = {loader}.from_pretrained({args.out!r})")
    if meta["class"].startswith("Timm"):
        print("  (it pools by average, as no transformers ViT class does: transformers runs it through timm)")
    return 0
