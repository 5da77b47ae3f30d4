"""The reconstruction grid shows what it says: visible patches are the original's."""

import torch

from maelab.callbacks.reconstructions import reconstruction_grid
from tests.conftest import tiny_pretrain_module


def test_grid_columns_are_masked_input_reconstruction_and_original():
    torch.manual_seed(0)
    module = tiny_pretrain_module()
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    grid = reconstruction_grid(module, images)
    pad, size = 2, 16

    def cell(row: int, col: int) -> torch.Tensor:
        top, left = pad + row * (size + pad), pad + col * (size + pad)
        return grid[:, top : top + size, left : left + size]

    for row in range(2):
        masked, reconstruction, original = cell(row, 0), cell(row, 1), cell(row, 2)
        assert torch.allclose(original, images[row].float() / 255, atol=1e-5)
        grey = (masked == 0.5).all(dim=0)  # hidden patches, painted grey
        assert 0.6 < grey.float().mean() < 0.9  # 12 of 16 patches masked (0.75)
        visible = ~grey
        # visible patches are pasted back unchanged; masked ones are the model's prediction
        assert torch.allclose(reconstruction[:, visible], original[:, visible], atol=1e-5)
        assert not torch.allclose(reconstruction[:, grey], original[:, grey], atol=1e-2)
