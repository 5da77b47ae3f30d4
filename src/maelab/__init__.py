"""maelab: Masked Autoencoder research with PyTorch Lightning and Hydra."""

import time

__version__ = "0.1.0"

# When this process started work (the first import of maelab, before torch): a run's
# results.json counts its elapsed time from here, so imports, data loading and compilation count.
PROCESS_START = time.monotonic()
