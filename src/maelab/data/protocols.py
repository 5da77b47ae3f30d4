"""What the rest of maelab needs from a datamodule, beyond Lightning's loaders.

Every maelab datamodule yields uint8 image batches ``(N, C, H, W)`` with int64 labels (or
normalised floats after a transform that normalises itself) and has ``batch_size``,
``num_classes``, ``img_size``, ``mean`` and ``std``. Two parts need more, checked with
``issubclass`` before a run is built (``config/checks.py``):

- ``PreviewImages``: a fixed, evenly spread set of images of a split. The reconstruction grid
  draws them every few epochs; a target fitted from data (PCA) is fitted on them.
- ``SplitsOnDevice``: a whole labelled split on the training device. The k-NN monitor embeds all
  of the training split as its memory bank at every check, which only a dataset held in memory
  makes cheap (CIFAR-10, synthetic; not an image folder decoded from disk).
"""

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class PreviewImages(Protocol):
    def preview_images(self, n: int, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
        """n images evenly spaced through ``split``: uint8 (n, C, H, W) on the CPU, and labels."""


@runtime_checkable
class SplitsOnDevice(Protocol):
    def split_on(self, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole ``split`` on ``device``: uint8 images (N, C, H, W) and int64 labels (N,)."""
