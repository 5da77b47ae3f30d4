"""``data.decode=fast`` (data/decode.py): torchvision's crop distribution, the full decode's pixels,
any file read as ``files.read_rgb`` reads it, unreadable files reported, the same sample twice."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from maelab.commands.bench_data import imagenet_like
from maelab.data import decode
from maelab.data.decode import FastRandomResizedCropFlip, FastResizeCenterCrop, reduction
from maelab.data.files import FileList, read_rgb
from maelab.data.imagenet import BadImage, ImageFiles, ImageFolderDataModule
from maelab.data.transforms import RandomResizedCropFlip
from maelab.errors import UserError
from tests.conftest import TREE_CLASSES, corrupt_one_file, make_tree, save_image_file

SIZE = 64


def photo(path, w: int, h: int, seed: int = 0, **save) -> str:
    """An ImageNet-like JPEG (noise, gradients, shapes) of w x h."""
    image = imagenet_like(np.random.default_rng(seed)).resize((w, h), Image.BICUBIC)
    save_image_file(path, image, quality=90, **save)
    return path


def test_the_crops_applied_are_torchvision_s_random_resized_crop_draw_for_draw(tmp_path, monkeypatch):
    """What the fast path crops (the box handed to the resize, scaled back from a reduced decode)
    is, sample for sample under the same seeds, the box torchvision's RandomResizedCrop draws on
    the decoded image; so its crop-scale and aspect histograms are torchvision's."""
    from maelab.data.samplers import sample_rng

    files = [photo(tmp_path / f"{w}.JPEG", w, h, seed=w) for w, h in ((500, 375), (375, 500), (1800, 1350))]
    used = []
    crop = decode.resized_crop
    monkeypatch.setattr(decode, "resized_crop", lambda p, b, *a: used.append((p, b)) or crop(p, b, *a))
    decoded = {path: T.functional.pil_to_tensor(read_rgb(path)) for path in files}
    transform, ours, theirs = FastRandomResizedCropFlip(224), [], []
    for i in range(150):
        path = files[i % 3]
        with sample_rng(7, 0, i):
            transform(path)
        pixels, box = used[-1]
        width = pixels.width if isinstance(pixels, Image.Image) else pixels.shape[-1]
        r = decoded[path].shape[-1] / width  # the reduction libjpeg took (1 for a full decode)
        ours.append([v * r for v in box])
        with sample_rng(7, 0, i):
            theirs.append(T.RandomResizedCrop.get_params(decoded[path], [0.2, 1.0], [3 / 4, 4 / 3]))
    ours, theirs = np.array(ours), np.array(theirs, dtype=float)
    assert np.allclose(ours, theirs, atol=1e-6)
    sizes = np.array([decoded[files[i % 3]].shape[-2:] for i in range(150)], dtype=float)  # (h, w)
    for boxes in (ours, theirs):
        scale = boxes[:, 2] * boxes[:, 3] / sizes.prod(axis=1)
        assert 0.2 * 0.95 < scale.min() and scale.max() <= 1.0
    histogram = lambda b: np.histogram(b[:, 2] * b[:, 3] / sizes.prod(axis=1), bins=8, range=(0.2, 1))[0]  # noqa: E731
    assert histogram(ours).tolist() == histogram(theirs).tolist() and histogram(ours).min() > 0  # every bin met


def test_a_reduced_decode_keeps_the_crop_at_least_size_pixels_and_the_box_exact(tmp_path, monkeypatch):
    """A crop of at least 2, 4 or 8 times the output on each side is decoded at 1/2, 1/4 or 1/8;
    its box, drawn in full-size pixels, is the same region of the reduced image."""
    path, size = photo(tmp_path / "big.JPEG", 1600, 1200), 200
    drawn, used = [], []
    transform = FastRandomResizedCropFlip(size)
    box = transform.box
    monkeypatch.setattr(transform, "box", lambda h, w: drawn.append(box(h, w)) or drawn[-1])
    crop = decode.resized_crop
    monkeypatch.setattr(decode, "resized_crop", lambda p, b, *a: used.append((p, b)) or crop(p, b, *a))
    torch.manual_seed(0)
    for _ in range(30):
        transform(path)
    reductions = []
    for (top, left, h, w), (image, reduced_box) in zip(drawn, used):
        r = reduction(h, w, size)
        reductions.append(r)
        assert image.size == (-(-1600 // r), -(-1200 // r))  # libjpeg's 1/r size
        assert np.allclose(np.array(reduced_box) * r, [top, left, h, w])  # the same region
        assert min(reduced_box[2:]) >= size  # never fewer pixels than the output
    assert set(reductions) == {2, 4}  # crops of 400 to 1200 pixels a side


def same_seed(transform, source, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return transform(source)


def mean_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


@pytest.mark.parametrize(("w", "h", "bound"), [(500, 375, 0.5), (1800, 1350, 4.0)])
def test_the_output_matches_the_full_decode_for_the_same_draws(tmp_path, w, h, bound):
    """The same seed gives the same box and flip as ``data.decode=pil``; pixels differ by the
    resize kernel's rounding at full size (500 x 375 at 224: never reduced), by libjpeg's DCT
    downscaling where the crop allows 1/2 or 1/4 (uint8 levels, mean absolute difference: about 3 on
    this grainy picture, under 1 on smooth ones)."""
    path = photo(tmp_path / "photo.JPEG", w, h)
    fast, pil = RandomResizedCropFlip(224).per_file(), RandomResizedCropFlip(224).per_image()
    for seed in range(6):
        assert mean_abs_difference(same_seed(fast, path, seed), same_seed(pil, read_rgb(path), seed)) < bound
    evaluation = T.Compose([T.Resize(256, T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.PILToTensor()])
    assert mean_abs_difference(FastResizeCenterCrop(224, 256)(path), evaluation(read_rgb(path))) < bound


def awkward_files(root) -> list:
    """The oddities of ImageNet (make_tree's) and of photo folders; the large ones take the
    reduced decode."""
    odd = make_tree(root) / "train" / TREE_CLASSES[0]
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees the other way to display
    files = [odd / f"{name}.JPEG" for name in ("gray", "cmyk", "png_inside", "rotated")]
    files += [photo(root / "big_rotated.JPEG", 1200, 800, exif=exif), photo(root / "big_cmyk.JPEG", 900, 900)]
    Image.open(files[-1]).convert("CMYK").save(files[-1], quality=90)
    small = imagenet_like(np.random.default_rng(1)).resize((90, 70))
    palette = small.convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    gray16 = Image.fromarray(np.linspace(0, 65535, 90 * 70).reshape(70, 90).astype(np.uint16))
    pngs = {"palette": palette, "rgba": small.convert("RGBA"), "gray16": gray16, "gray_alpha": small.convert("LA")}
    for name, image in pngs.items():
        save_image_file(root / f"{name}.png", image, fmt="PNG")
    return files + [root / f"{name}.png" for name in pngs]


def test_any_file_gives_upright_rgb_as_read_rgb_does(tmp_path):
    fast, pil = RandomResizedCropFlip(SIZE).per_file(), RandomResizedCropFlip(SIZE).per_image()
    for path in awkward_files(tmp_path):
        image = same_seed(fast, path, 0)
        assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE), path.name
        assert mean_abs_difference(image, same_seed(pil, read_rgb(path), 0)) < 3.0, path.name  # big ones: at 1/r
        evaluation = FastResizeCenterCrop(SIZE, 73)(path)
        assert evaluation.dtype == torch.uint8 and evaluation.shape == (3, SIZE, SIZE), path.name


def test_unreadable_files_are_bad_images_as_with_the_pil_path(tmp_path):
    broken = corrupt_one_file(make_tree(tmp_path))  # 200 bytes of a JPEG: the header cut
    data = (photo(tmp_path / "whole.JPEG", 500, 375)).read_bytes()
    (tmp_path / "half.JPEG").write_bytes(data[: len(data) // 2])  # the header whole, the pixels cut
    data = (photo(tmp_path / "big.JPEG", 1800, 1350)).read_bytes()
    (tmp_path / "big_half.JPEG").write_bytes(data[: len(data) // 2])  # the reduced decode's path
    (tmp_path / "text.JPEG").write_text("not an image")
    paths = [broken, tmp_path / "half.JPEG", tmp_path / "big_half.JPEG", tmp_path / "text.JPEG"]
    files = FileList.of([(p, 0) for p in paths])
    for transform in (RandomResizedCropFlip(SIZE).per_file(), FastResizeCenterCrop(SIZE, 73)):
        for key in range(len(paths)):
            sample = ImageFiles(files, transform)[(key, 0)]
            assert isinstance(sample, BadImage) and sample.path == str(paths[key]), sample


def test_the_same_sample_gives_the_same_crop_in_any_worker_and_after_a_resume(tmp_path):
    path = photo(tmp_path / "photo.JPEG", 900, 700)
    files = FileList.of([(path, 3)])
    fast = ImageFiles(files, RandomResizedCropFlip(SIZE).per_file(), seed=7)
    first, label = fast[(0, 2)]
    torch.manual_seed(123)  # another worker's stream: the sample's own seed decides
    assert torch.equal(fast[(0, 2)][0], first) and label == 3
    assert not torch.equal(fast[(0, 3)][0], first)  # another epoch, another crop
    pil = ImageFiles(files, RandomResizedCropFlip(SIZE).per_image(), seed=7)
    assert mean_abs_difference(pil[(0, 2)][0], first) < 5.0  # the same box and flip as data.decode=pil


def test_a_decoded_image_is_cropped_too():
    """Previews and a grayscale folder hand the transform an image, not a path."""
    image = imagenet_like(np.random.default_rng(0))
    assert RandomResizedCropFlip(SIZE).per_file()(image).shape == (3, SIZE, SIZE)
    assert FastResizeCenterCrop(SIZE, 73)(image.convert("L")).shape == (1, SIZE, SIZE)


def test_the_datamodule_takes_fast_or_pil_and_refuses_the_rest(tmp_path):
    tree = make_tree(tmp_path)
    fast = ImageFolderDataModule(str(tree), img_size=224, decode="fast")
    evaluation = fast.eval_transform()
    assert isinstance(evaluation, FastResizeCenterCrop) and (evaluation.resize, evaluation.size) == (256, 224)
    assert isinstance(ImageFolderDataModule(str(tree), decode="pil").eval_transform(), T.Compose)
    with pytest.raises(UserError, match="data.decode='jpeg': expected one of fast, pil, gpu"):
        ImageFolderDataModule(str(tree), decode="jpeg")


@pytest.mark.parametrize("decode_setting", ["fast", "pil"])
def test_the_training_loader_decodes_as_data_decode_says(tmp_path, decode_setting):
    from omegaconf import OmegaConf

    from maelab.run.build import loader_augmentation

    dm = ImageFolderDataModule(
        str(make_tree(tmp_path)), img_size=32, batch_size=4, num_workers=0, decode=decode_setting
    )
    cfg = OmegaConf.create(
        {
            "augment": {"_target_": "maelab.data.transforms.RandomResizedCropFlip"},
            "data": {"img_size": 32, "mean": [0], "std": [1]},
        }
    )
    assert loader_augmentation(cfg, dm)
    assert getattr(dm.train_transform, "reads_files", False) == (decode_setting == "fast")
    dm.setup()
    images, _ = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
