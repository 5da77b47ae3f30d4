"""k-NN accuracy of the encoder's features while pretraining (Wu et al. 2018, as in DINO):
the training images are the memory bank, each validation image votes with its k most similar
neighbours (cosine similarity), weighted by exp(similarity / temperature)."""

import logging

import lightning as L
import torch
import torch.nn.functional as F

from maelab.data.transforms import model_input

log = logging.getLogger(__name__)


@torch.no_grad()
def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy of weighted k-NN voting; features need not be normalised."""
    bank = F.normalize(train_feats.float(), dim=1)
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(query_feats), chunk):
        q = F.normalize(query_feats[start : start + chunk].float(), dim=1)
        sims, idx = (q @ bank.T).topk(k, dim=1)  # (n, k)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        correct += (votes.argmax(dim=1) == query_labels[start : start + chunk]).sum().item()
    return correct / len(query_feats)


class KNNMonitor(L.Callback):
    """Logs ``val/knn_acc`` with the validation of every ``every_n_epochs``-th epoch (and of the
    last), so it lands in that epoch's metrics; a validation epoch it does not fall on. cls-token
    features of unmasked, un-augmented images. Every rank computes the same figure (the bank is
    the whole training split), so no gather is needed; on CIFAR-10 it takes seconds on a GPU."""

    def __init__(self, every_n_epochs: int = 10, k: int = 20, temperature: float = 0.07, batch_size: int = 1024):
        self.every_n_epochs = every_n_epochs
        self.k, self.temperature, self.batch_size = k, temperature, batch_size

    @torch.no_grad()
    def features(
        self, trainer: L.Trainer, pl_module: L.LightningModule, split: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = trainer.datamodule.split_on(split, pl_module.device)
        feats = []
        with trainer.precision_plugin.forward_context():  # bf16 on a GPU, as training
            for start in range(0, len(images), self.batch_size):
                x = model_input(
                    images[start : start + self.batch_size], pl_module.mean, pl_module.std, pl_module.img_size
                )
                feats.append(pl_module.model.forward_features(x)[:, 0].float())
        return torch.cat(feats), labels

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.unlabelled = not trainer.datamodule.num_classes
        if self.unlabelled and trainer.is_global_zero:
            log.info("k-NN monitor skipped: the images have no labels (no class folders); val/loss is the measure")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(self, "unlabelled", False):
            return
        epoch = trainer.current_epoch + 1
        if trainer.sanity_checking or (epoch % self.every_n_epochs and epoch != trainer.max_epochs):
            return
        was_training = pl_module.training
        pl_module.eval()
        train_feats, train_labels = self.features(trainer, pl_module, "train")
        val_feats, val_labels = self.features(trainer, pl_module, "val")
        pl_module.train(was_training)
        acc = knn_accuracy(
            train_feats, train_labels, val_feats, val_labels, trainer.datamodule.num_classes, self.k, self.temperature
        )
        pl_module.log("val/knn_acc", acc, rank_zero_only=True)
