"""Pure-PyTorch models: no Lightning, no Hydra."""

from maelab.models.mae import MaskedAutoencoder
from maelab.models.vit import VisionTransformer

__all__ = ["MaskedAutoencoder", "VisionTransformer"]
