"""Reconstruction grids (paper Fig. 2): masked input | reconstruction | original, as PNG and in
the loggers that show images."""

import logging
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from maelab.atomic import write_atomically
from maelab.data.transforms import denormalize

log = logging.getLogger(__name__)

MASKED_GREY = 0.5  # the colour of hidden patches in the "masked input" column


@torch.no_grad()
def reconstruct(
    module: L.LightningModule, images: torch.Tensor, mask_ratio: float, masking=None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked input, reconstruction with the visible patches pasted back, original), each
    (N, C, H, W) in [0, 1], for uint8 images. ``masking``: a strategy other than the model's."""
    model = module.model
    x = module.preprocess(images.to(module.device), train=False)
    g = torch.Generator(device=x.device).manual_seed(seed)  # the same masks every time
    masking = masking or model.masking
    noise = masking.noise(len(x), model.patch_embed.grid_size, mask_ratio, x.device, g)
    was_training = model.training
    model.eval()
    _, pred, mask = model(x, mask_ratio, noise)
    model.train(was_training)

    pred = model.unpatchify(model.target.to_pixels(pred.float(), x))  # norm_pixel: per-patch stats undone
    p = model.patch_size
    channels = x.shape[1]
    hidden = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * channels))  # 1 where masked
    original = denormalize(x, module.mean, module.std)
    reconstruction = denormalize(x * (1 - hidden) + pred * hidden, module.mean, module.std)
    masked = original * (1 - hidden) + MASKED_GREY * hidden
    return masked.clamp(0, 1), reconstruction.clamp(0, 1), original.clamp(0, 1)


def reconstruction_grid(module: L.LightningModule, images: torch.Tensor, seed: int = 0) -> torch.Tensor | None:
    """One row per image: masked input, reconstruction, original; as a [0, 1] image (3, H, W).
    None for targets that are not pixels."""
    if not module.model.target.in_pixel_space:
        return None
    masked, reconstruction, original = reconstruct(module, images, module.mask_ratio, seed=seed)
    rows = torch.stack([masked, reconstruction, original], dim=1).flatten(0, 1)  # (3N, 3, H, W)
    return make_grid(rows, nrow=3, padding=2, pad_value=1.0)


def log_image(trainer: L.Trainer, key: str, image: torch.Tensor, step: int) -> None:
    """An image (3, H, W) in [0, 1] to every logger that shows images (W&B, TensorBoard)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key, [image], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, step)


class ReconstructionGrid(L.Callback):
    """Writes ``out_dir/epoch_NNNN.png`` for a fixed set of validation images, every
    ``every_n_epochs`` epochs and at the end of training, on rank 0. NNNN is the index of the
    epoch just finished, counted from 0 as in checkpoint names (and the official MAE's
    ``checkpoint-799.pth`` after 800 epochs)."""

    def __init__(self, out_dir: str, every_n_epochs: int = 10, num_images: int = 8, min_size: int = 96):
        self.out_dir = Path(out_dir)
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.min_size = min_size  # small images are enlarged (nearest) so the PNG is legible
        self.written: list[Path] = []

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        path = self.out_dir / f"epoch_{epoch:04d}.png"
        if not trainer.is_global_zero or path in self.written:
            return
        images, _ = trainer.datamodule.preview_images(self.num_images)
        grid = reconstruction_grid(pl_module, images)
        if grid is None:
            log.info("target %s is not in pixel space: no reconstruction images", type(pl_module.model.target).__name__)
            return
        size = images.shape[-1]
        if size < self.min_size:
            scale = -(-self.min_size // size)
            images_big = F.interpolate(grid.unsqueeze(0), scale_factor=scale, mode="nearest")
            grid = images_big.squeeze(0)
        write_atomically(path, lambda f: save_image(grid, f, format="png"))
        log_image(trainer, "reconstructions", grid, trainer.global_step)  # W&B, TensorBoard
        self.written.append(path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._write(trainer, pl_module, trainer.current_epoch)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, max(0, trainer.current_epoch - 1))  # the counter has moved on
