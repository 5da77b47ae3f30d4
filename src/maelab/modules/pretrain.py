"""MAE pretraining as a LightningModule: augment on the device, mask, reconstruct, regress."""

import logging

import lightning as L
import torch
from hydra.utils import instantiate

from maelab.data.transforms import model_input
from maelab.models.mae import MaskedAutoencoder
from maelab.modules.compiling import compiled_call
from maelab.modules.optim import adamw_warmup_cosine, param_groups_weight_decay

log = logging.getLogger(__name__)


class PretrainModule(L.LightningModule):
    """Arguments are plain values (Hydra passes them converted), so the checkpoint's
    hyper-parameters alone rebuild the model: ``PretrainModule.load_from_checkpoint(path)``."""

    def __init__(
        self,
        model: dict,
        target: dict,
        masking: dict,
        augment: dict | None,
        img_size: int,
        mean: list[float],
        std: list[float],
        mask_ratio: float = 0.75,
        decoder_width: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        base_lr: float = 1.5e-4,
        min_lr: float = 0.0,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 40,
        effective_batch_size: int | None = None,  # a recipe value; the run derives accumulation from it
        init_from: str | None = None,  # start from a pretraining checkpoint (maelab or official MAE)
        compile: bool = False,  # torch.compile the training forward (measure with maelab bench first)
    ):
        super().__init__()
        self.save_hyperparameters()
        patch_size = model["patch_size"]
        self.model = MaskedAutoencoder(
            img_size=img_size,
            **model,
            decoder_width=decoder_width,
            decoder_depth=decoder_depth,
            decoder_heads=decoder_heads,
            target=instantiate(target, patch_size=patch_size, in_chans=model.get("in_chans", 3)),
            masking=instantiate(masking),
        )
        self.model.num_visible(mask_ratio)  # fails now, not at the first step, if nothing stays visible
        self.model.masking.check(self.model.patch_embed.grid_size, mask_ratio)
        self.augment = instantiate(augment, size=img_size) if augment else None
        self.mask_ratio = mask_ratio
        self.img_size = img_size
        self.mean, self.std = list(mean), list(std)

    def load_initial_weights(self, trust: bool = False) -> None:
        """``init_from``, loaded by a fresh run (not in __init__: a resumed run or
        ``load_from_checkpoint`` takes every weight from its own checkpoint). ``trust``: the
        file may hold pickled code (``trust_checkpoint_code``)."""
        if self.hparams.init_from:
            from maelab.weights.pretrained import load_full

            load_full(self.model, self.hparams.init_from, trust)

    def on_fit_start(self) -> None:
        """A target estimated from data (PCA) is fitted once, by rank 0, on the evaluation view
        of training images evenly spread over the split, and broadcast so all ranks agree. A
        resumed run has it from its checkpoint."""
        target = self.model.target
        if not hasattr(target, "fit") or target.ready:
            return
        if self.trainer.is_global_zero:
            L = self.model.patch_embed.num_patches
            images, _ = self.trainer.datamodule.preview_images(-(-target.num_patches // L), split="train")
            target.fit(self.preprocess(images.to(self.device), train=False), torch.Generator().manual_seed(0))
            log.info(
                "target %s: %d components fitted on %d training images",
                type(target).__name__,
                target.out_dim,
                len(images),
            )
        if self.trainer.world_size > 1:
            import torch.distributed as dist

            for buffer in target.buffers():
                sent = buffer.float()  # bool does not travel on every backend
                dist.broadcast(sent, src=0)
                buffer.copy_(sent.to(buffer.dtype))
            target.ready = True

    def preprocess(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        """uint8 (N, 3, H, W) on the device -> normalised float (N, 3, img_size, img_size)."""
        return model_input(images, self.mean, self.std, self.img_size, self.augment if train else None)

    def training_forward(self, x: torch.Tensor):
        """The model on a training batch; compiled with ``compile=true`` (modules/compiling.py)."""
        return compiled_call(self, self.model, self.hparams.compile, x, self.mask_ratio)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, _ = batch
        loss, _, _ = self.training_forward(self.preprocess(images, train=True))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, _ = batch
        x = self.preprocess(images, train=False)
        # the same masks every epoch, so val/loss curves compare like with like
        g = torch.Generator(device=x.device).manual_seed(batch_idx)
        noise = self.model.masking.noise(len(x), self.model.patch_embed.grid_size, self.mask_ratio, x.device, g)
        loss, _, _ = self.model(x, self.mask_ratio, noise)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        groups = param_groups_weight_decay(self.model, hp.weight_decay)
        return adamw_warmup_cosine(self, groups, hp.base_lr, hp.min_lr, hp.betas, hp.warmup_epochs)
