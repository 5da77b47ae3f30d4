"""``maelab export CKPT OUT``: a checkpoint's encoder (and head) as a timm ``VisionTransformer``
state dict plus ``OUT.json`` with the ``timm.create_model`` arguments (``weights/timm.py``)."""

from maelab.commands import add_trust_flag
from maelab.weights.timm import export


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="maelab export",
        description="Write the encoder (and head) of a maelab .ckpt or an official MAE .pth as a timm "
        "VisionTransformer state dict, and OUT.json with the timm.create_model arguments.",
    )
    parser.add_argument("ckpt", help="a maelab checkpoint (last.ckpt) or an official MAE .pth")
    parser.add_argument("out", help="the state dict to write (e.g. vit_t2_cifar10.pth)")
    parser.add_argument("--global-pool", choices=("avg", "token"), help="default: the classifier's own, else token")
    parser.add_argument("--num-heads", type=int, help="for official files of a width other than the named sizes")
    add_trust_flag(parser)
    args = parser.parse_args(argv)
    meta = export(args.ckpt, args.out, args.global_pool, args.num_heads, trust=args.trust_checkpoint_code)
    kwargs = ", ".join(f"{k}={v!r}" for k, v in meta["kwargs"].items())
    if meta["kwargs"]["global_pool"] == "avg" and meta["kwargs"]["num_classes"] == 0:
        print("note: fc_norm (after pooling) takes the encoder's final norm: a start for fine-tuning")
    print(f"wrote {args.out}; load it with:")
    print(f"  model = timm.create_model({meta['timm_model']!r}, pretrained=False, {kwargs})")
    print(f"  model.load_state_dict(torch.load({args.out!r}))")
    return 0
