"""maelab: Masked Autoencoder research with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
