"""Batched on-device augmentation: exact identity, exact flips, torchvision's box statistics."""

import pytest
import torch

from maelab.data.transforms import PadCropFlip, RandomResizedCropFlip, denormalize, normalize, resized_crops


def test_full_box_without_flip_is_the_identity_and_flip_mirrors():
    imgs = torch.rand(4, 3, 32, 32)
    full = torch.tensor([[0, 0, 32, 32]] * 4)
    assert torch.allclose(resized_crops(imgs, full, 32), imgs, atol=1e-6)
    flip = torch.tensor([True, False, True, False])
    out = resized_crops(imgs, full, 32, flip)
    assert torch.allclose(out[0], imgs[0].flip(-1), atol=1e-6)
    assert torch.allclose(out[1], imgs[1], atol=1e-6)


def test_a_box_crops_that_region():
    imgs = torch.rand(1, 3, 32, 32)
    box = torch.tensor([[8, 4, 16, 16]])  # top 8, left 4, 16x16, upsampled x2 with nearest
    out = resized_crops(imgs, box, 32, interpolation="nearest")
    assert torch.equal(out[0, :, ::2, ::2], imgs[0, :, 8:24, 4:20])


def test_boxes_follow_the_scale_and_ratio_ranges_per_image():
    aug = RandomResizedCropFlip(32, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
    torch.manual_seed(0)
    boxes = aug.sample_boxes(4000, 32, 32)
    top, left, h, w = boxes.unbind(1)
    assert torch.all(top >= 0) and torch.all(left >= 0)
    assert torch.all(top + h <= 32) and torch.all(left + w <= 32)
    area = h * w / (32 * 32)
    # rounding to whole pixels moves area and aspect a little beyond the continuous ranges
    assert area.min() >= 0.17 and area.max() <= 1.0
    assert (w / h).min() >= 0.75 * 0.9 and (w / h).max() <= 4 / 3 * 1.1
    assert 0.5 < area.mean() < 0.65  # uniform in (0.2, 1) has mean 0.6
    assert len({tuple(b.tolist()) for b in boxes[:100]}) > 90  # per-image parameters


def test_fallback_is_a_center_crop_within_the_ratio():
    aug = RandomResizedCropFlip(16, scale=(0.99, 1.0), ratio=(2.0, 3.0))  # cannot fit in a square image
    boxes = aug.sample_boxes(5, 32, 32)
    # no attempt fits (width would exceed 32 px): 32 wide, 32 / 2 = 16 high, centred vertically
    assert torch.all(boxes == torch.tensor([8.0, 0.0, 16.0, 32.0]))


def test_augment_output_shape_and_normalisation_round_trip():
    imgs = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    x = normalize(imgs, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    assert torch.allclose(denormalize(x, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]) * 255, imgs.float(), atol=1e-3)
    out = RandomResizedCropFlip(24)(x)
    assert out.shape == (8, 3, 24, 24) and out.dtype == torch.float32


def test_pad_crop_flip_takes_windows_of_the_reflect_padded_image_and_mirrors_half():
    import torch.nn.functional as F

    imgs = torch.randn(512, 3, 8, 8)
    out = PadCropFlip(8, padding=2)(imgs, generator=torch.Generator().manual_seed(0))
    assert out.shape == (512, 3, 8, 8)
    padded = F.pad(imgs, (2, 2, 2, 2), mode="reflect")
    offsets, flips = set(), 0
    for i in range(len(imgs)):  # each output is exactly one window, possibly mirrored
        found = [
            (t, l, f)
            for t in range(5)
            for l in range(5)
            for f in (False, True)
            if torch.equal(out[i], (lambda w: w.flip(-1) if f else w)(padded[i, :, t : t + 8, l : l + 8]))
        ]
        assert len(found) == 1, i
        offsets.add(found[0][:2])
        flips += found[0][2]
    assert len(offsets) == 25  # all 5 x 5 translations occur
    assert 200 < flips < 312  # about half are mirrored


def test_pad_crop_flip_without_padding_or_flip_is_the_identity():
    imgs = torch.randn(4, 3, 8, 8)
    assert torch.equal(PadCropFlip(8, padding=0, hflip=False)(imgs), imgs)


def test_pad_crop_flip_refuses_what_it_cannot_do_with_the_accepted_range():

    with pytest.raises(ValueError, match="padding must be 0 to 31 pixels for reflect padding of 32 px, got 32"):
        PadCropFlip(32, padding=32)
    with pytest.raises(ValueError, match="padding_mode must be reflect or replicate, got 'constant'"):
        PadCropFlip(32, padding_mode="constant")
    with pytest.raises(ValueError, match="padding must be 0 or more pixels, got -1"):
        PadCropFlip(32, padding=-1, padding_mode="replicate")
    assert PadCropFlip(8, padding=12, padding_mode="replicate")(torch.randn(2, 3, 8, 8)).shape == (2, 3, 8, 8)


def test_randaugment_at_full_magnitude_keeps_running():
    """RandAugment's increasing posterize keeps 0 bits at magnitude 10; Pillow >= 11 refuses
    that, so the transform maps it to the black image older Pillow produced."""
    from PIL import Image

    from maelab.data.timm_augment import TimmTrainTransform, posterize

    black = posterize(Image.new("RGB", (4, 4), (200, 100, 50)), 0)
    assert black.getextrema() == ((0, 0), (0, 0), (0, 0))
    t = TimmTrainTransform(32, [0.5] * 3, [0.25] * 3, auto_augment="rand-m10-n4-mstd0-inc1")
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    outs = torch.stack([t(img) for img in images])
    assert outs.shape == (64, 3, 32, 32) and outs.dtype == torch.float32
