"""Classification with the MAE encoder: fine-tuning, linear probing, partial fine-tuning and
training from scratch are one module with different settings (``conf/task/*.yaml``)."""

import logging

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from timm.loss import SoftTargetCrossEntropy
from torchmetrics.classification import MulticlassAccuracy

from maelab.data.transforms import model_input
from maelab.errors import UserError
from maelab.models.classifier import ViTClassifier
from maelab.modules.compiling import compiled_call
from maelab.modules.optim import adamw_warmup_cosine, lars_warmup_cosine, param_groups_layer_decay

log = logging.getLogger(__name__)


class ClassifierModule(L.LightningModule):
    monitor = ("val/acc1", "max")  # results.json's best epoch, on the validation split

    def __init__(
        self,
        model: dict,
        num_classes: int,
        img_size: int,
        mean: list[float],
        std: list[float],
        augment: dict | None = None,
        pretrained: str | None = None,
        global_pool: str = "avg",
        head_batchnorm: bool = False,
        head_init_std: float = 2e-5,
        freeze_encoder: bool = False,
        trainable_blocks: int | None = None,
        drop_path_rate: float = 0.0,
        optimizer: str = "adamw",
        base_lr: float = 5e-4,
        min_lr: float = 1e-6,
        weight_decay: float = 0.05,
        layer_decay: float = 0.75,
        betas: tuple[float, float] = (0.9, 0.999),
        momentum: float = 0.9,
        warmup_epochs: float = 5,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        label_smoothing: float = 0.0,
        effective_batch_size: int | None = None,  # a recipe value; the run derives accumulation from it
        compile: bool = False,  # torch.compile the training forward (measure with maelab bench first)
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = ViTClassifier(
            num_classes,
            global_pool=global_pool,
            head_batchnorm=head_batchnorm,
            head_init_std=head_init_std,
            train_pos_embed=not freeze_encoder,
            img_size=img_size,
            drop_path_rate=drop_path_rate,
            **model,
        )
        self.frozen = self._freeze(freeze_encoder, trainable_blocks)
        # A batched device augmentation (rrc_flip) lives here; a PIL one (randaug) in the loader.
        self.augment = instantiate(augment, size=img_size) if augment else None
        self.img_size, self.mean, self.std = img_size, list(mean), list(std)
        self.mixup = self._mixup(mixup, cutmix, label_smoothing, num_classes)
        self.soft_target_loss = SoftTargetCrossEntropy()  # mixup's soft labels, label smoothing included
        self.metrics = torch.nn.ModuleDict(
            {
                f"{split}_acc{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
                for split in ("val", "test")
                for k in ((1, 5) if num_classes > 5 else (1,))
            }
        )

    def load_initial_weights(self, trust: bool = False) -> None:
        """The pretrained encoder, loaded by a fresh run (not in __init__: a resumed run or
        ``load_from_checkpoint`` takes every weight from its own checkpoint, not from this file).
        ``trust``: the file may hold pickled code (``trust_checkpoint_code``)."""
        if self.hparams.pretrained:
            from maelab.weights.pretrained import load_encoder

            load_encoder(self.model, self.hparams.pretrained, trust)

    def _freeze(self, freeze_encoder: bool, trainable_blocks: int | None) -> list[torch.nn.Module]:
        """Freeze the encoder (linear probe) or all but its last ``trainable_blocks`` blocks
        (partial fine-tuning, the paper's Fig. 9); return the modules kept in eval mode."""
        m = self.model
        if freeze_encoder:
            frozen = m.encoder_modules()
        elif trainable_blocks is not None:  # (config/checks.py refuses both at once)
            if not 0 <= trainable_blocks <= len(m.blocks):
                raise UserError(f"task.trainable_blocks={trainable_blocks}: expected 0..{len(m.blocks)} (the depth)")
            frozen = [m.patch_embed, *m.blocks[: len(m.blocks) - trainable_blocks]]
        else:
            return []
        for module in frozen:
            module.requires_grad_(False)
            module.eval()  # Lightning restores each module's own mode after validation
        m.cls_token.requires_grad_(False)
        m.pos_embed.requires_grad_(False)
        frozen_params = sum(p.numel() for p in m.parameters() if not p.requires_grad)
        log.info(f"frozen and in eval mode: {len(frozen)} encoder modules, {frozen_params:,} parameters")
        return frozen

    @staticmethod
    def _mixup(mixup: float, cutmix: float, label_smoothing: float, num_classes: int):
        if mixup <= 0 and cutmix <= 0:
            return None
        from timm.data import Mixup

        return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode, so a probe measures the encoder as it is."""
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def training_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a training batch; compiled with ``compile=true`` (modules/compiling.py)."""
        return compiled_call(self, self.model, self.hparams.compile, x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        x = model_input(images, self.mean, self.std, self.img_size, self.augment)
        if self.mixup is not None:
            x, soft = self.mixup(x, labels)  # soft targets, label smoothing included
            loss = self.soft_target_loss(self.training_forward(x), soft)
        else:
            loss = F.cross_entropy(self.training_forward(x), labels, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[-1])  # the head's: unscaled
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> None:
        images, labels = batch
        logits = self.model(model_input(images, self.mean, self.std, self.img_size))
        self.log(f"{split}/loss", F.cross_entropy(logits, labels), prog_bar=True, sync_dist=True)
        for name, metric in self.metrics.items():
            if name.startswith(split):
                metric(logits, labels)
                self.log(f"{split}/{name.split('_')[1]}", metric, prog_bar=name.endswith("acc1"))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        if hp.optimizer == "lars":
            groups = param_groups_layer_decay(self.model, hp.weight_decay, 1.0)
            return lars_warmup_cosine(self, groups, hp.base_lr, hp.min_lr, hp.momentum, hp.warmup_epochs)
        if hp.optimizer == "adamw":
            groups = param_groups_layer_decay(self.model, hp.weight_decay, hp.layer_decay)
            return adamw_warmup_cosine(self, groups, hp.base_lr, hp.min_lr, hp.betas, hp.warmup_epochs)
        raise UserError(f"task.optimizer={hp.optimizer!r}: expected 'adamw' or 'lars'")
