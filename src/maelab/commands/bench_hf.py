"""The reference point of ``maelab bench --compare hf``: HuggingFace ``transformers``'
``ViTMAEForPreTraining`` at the same sizes, batch, mask ratio and precision, timed by the same
loop (a full step: forward, backward, AdamW), on the same images (no augmentation: HF's model
has none; maelab's step includes its own)."""

import torch

from maelab.commands.timing import time_steps


def hf_config(model, mask_ratio: float, norm_pix: bool):
    from transformers import ViTMAEConfig

    encoder, decoder = model.blocks[0], model.decoder_blocks[0]
    return ViTMAEConfig(
        hidden_size=model.embed_dim,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=encoder.attn.num_heads,
        intermediate_size=encoder.mlp.fc1.out_features,
        decoder_hidden_size=model.decoder_embed.out_features,
        decoder_num_hidden_layers=len(model.decoder_blocks),
        decoder_num_attention_heads=decoder.attn.num_heads,
        decoder_intermediate_size=decoder.mlp.fc1.out_features,
        image_size=model.patch_embed.img_size,
        patch_size=model.patch_size,
        mask_ratio=mask_ratio,
        norm_pix_loss=norm_pix,
        attn_implementation="sdpa",
    )


def bench_hf(
    module, batch: int, img_size: int, steps: int, warmup: int, compile_model: bool, device, backend: str
) -> dict:
    """HF's step eagerly and, when maelab's is compiled, compiled with the same backend:
    ``{"eager": {...}, "compiled": {...}}``."""
    try:
        from transformers import ViTMAEForPreTraining
    except ImportError:
        return {"skipped": "transformers is not installed (pip install transformers)"}
    from maelab.modules.compiling import compile_or_explain

    norm_pix = type(module.model.target).__name__ == "NormPixelTarget"
    model = ViTMAEForPreTraining(hf_config(module.model, module.mask_ratio, norm_pix)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    pixels = torch.randn(batch, 3, img_size, img_size, device=device)
    bf16 = device.type == "cuda"

    def timed(forward) -> dict:
        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = forward(pixel_values=pixels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = time_steps(step, device, steps, warmup)
        return {"img_per_s": round(batch / seconds, 1), "step_ms": round(seconds * 1e3, 2)}

    results = {"eager": timed(model)}
    if compile_model:
        compiled, why = compile_or_explain(model, backend)
        try:
            results["compiled"] = {**timed(compiled), "compile_backend": backend} if why is None else {"failed": why}
        except Exception as e:  # noqa: BLE001  (a model this torch cannot compile: say so, keep the eager figure)
            results["compiled"] = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    return results


def speedup(result: dict) -> dict:
    """maelab's img/s over HF's under the same settings (compiled when maelab was), and over
    HF eager."""
    hf = result["hf"]
    same = hf.get("compiled" if result["compiled"] else "eager", {})
    ratios = {}
    if "img_per_s" in same:
        ratios["speedup_vs_hf"] = round(result["img_per_s"] / same["img_per_s"], 2)
    if "img_per_s" in hf.get("eager", {}):
        ratios["speedup_vs_hf_eager"] = round(result["img_per_s"] / hf["eager"]["img_per_s"], 2)
    return ratios
