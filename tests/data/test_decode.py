"""``data.decode=fast`` (data/decode.py): torchvision's crop distribution, the full decode's pixels,
any file read as ``files.read_rgb`` reads it, unreadable files reported, the same sample twice."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision import transforms as T

from maelab.commands.bench_data import imagenet_like
from maelab.data import decode, jpeg_crop
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


class AppliedBoxes(list):
    """Records each box the fast path resizes, in full-size pixels of the file, with the reduction
    it was decoded at: the region the crop decoder decoded or a reduced decode cut out, or else
    the box in a whole decoded image (``full_width`` pixels wide at full size)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.regions, self.full_width = [], None
        crop_decode, cut, resize = jpeg_crop.decode, decode.reduced_box, decode.resized_crop

        def decoded_region(data, box, r=1):
            self.regions.append((box, r))
            return crop_decode(data, box, r)

        def reduced(box, r):
            self.regions.append((cut(box, r), r))
            return self.regions[-1][0]

        def resized(pixels, box, *rest):
            if self.regions:
                (top, left, h, w), r = self.regions[-1]
                self.regions.clear()
            else:
                (top, left, h, w), r = box, round(self.full_width / pixels.shape[-1])
            self.append(((top * r, left * r, h * r, w * r), r))
            return resize(pixels, box, *rest)

        monkeypatch.setattr(jpeg_crop, "decode", decoded_region)
        monkeypatch.setattr(decode, "reduced_box", reduced)
        monkeypatch.setattr(decode, "resized_crop", resized)


def edges(box) -> np.ndarray:
    top, left, h, w = box
    return np.array([top, left, top + h, left + w], dtype=float)


@pytest.mark.parametrize("crop_decoder", [True, False], ids=["crop decoder", "whole decode"])
def test_the_crops_applied_are_torchvision_s_random_resized_crop_draw_for_draw(tmp_path, monkeypatch, crop_decoder):
    """What the fast path crops is, sample for sample under the same seeds, the box torchvision's
    RandomResizedCrop draws on the decoded image: exactly at full size, and within r/2 pixels of
    each edge where it decodes at 1/r (the box then falls on the reduced image's pixel grid, half
    an output pixel at most). So its crop-scale and aspect histograms are torchvision's, to a
    sample on a bin's edge."""
    from maelab.data.samplers import sample_rng

    if crop_decoder and not jpeg_crop.available():
        pytest.skip(f"no crop decoder: {jpeg_crop.missing}")
    if not crop_decoder:
        monkeypatch.setattr(jpeg_crop, "available", lambda: False)
    files = [photo(tmp_path / f"{w}.JPEG", w, h, seed=w) for w, h in ((500, 375), (375, 500), (1800, 1350))]
    decoded = {path: T.functional.pil_to_tensor(read_rgb(path)) for path in files}
    applied = AppliedBoxes(monkeypatch)
    transform, ours, theirs, reductions = FastRandomResizedCropFlip(224), [], [], []
    for i in range(150):
        path = files[i % 3]
        applied.full_width = decoded[path].shape[-1]
        with sample_rng(7, 0, i, torch_only=True):
            transform(path)
        box, r = applied[-1]
        with sample_rng(7, 0, i):
            theirs.append(T.RandomResizedCrop.get_params(decoded[path], [0.2, 1.0], [3 / 4, 4 / 3]))
        assert np.abs(edges(box) - edges(theirs[-1])).max() <= r / 2, (i, box, theirs[-1], r)
        ours.append(box)
        reductions.append(r)
    assert set(reductions) == {1, 2, 4}  # 1800 x 1350 crops of 448 to 1350 pixels a side: 1/2, 1/4
    ours, theirs = np.array(ours, dtype=float), np.array(theirs, dtype=float)
    sizes = np.array([decoded[files[i % 3]].shape[-2:] for i in range(150)], dtype=float)  # (h, w)
    for boxes in (ours, theirs):
        scale = boxes[:, 2] * boxes[:, 3] / sizes.prod(axis=1)
        assert 0.2 * 0.95 < scale.min() and scale.max() <= 1.0
    scales = lambda b: np.histogram(b[:, 2] * b[:, 3] / sizes.prod(axis=1), bins=8, range=(0.2, 1))[0]  # noqa: E731
    aspects = lambda b: np.histogram(np.log(b[:, 3] / b[:, 2]), bins=6, range=np.log([3 / 4, 4 / 3]))[0]  # noqa: E731
    for histogram in (scales, aspects):
        assert np.abs(histogram(ours) - histogram(theirs)).max() <= 1 and histogram(ours).min() > 0  # every bin met


def smooth_picture(w: int, h: int) -> Image.Image:
    """Gradients and a disc, no grain: a crop a pixel off differs by little, a turn the wrong way
    by much."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    pixels = np.stack([x * 255 / w, y * 255 / h, 128 + 100 * np.sin(x / 23) * np.cos(y / 31)], axis=-1)
    image = Image.fromarray(pixels.astype(np.uint8))
    ImageDraw.Draw(image).ellipse((w // 5, h // 6, w // 2, h // 2), fill=(250, 30, 60))
    return image


@pytest.mark.parametrize("crop_decoder", [True, False], ids=["crop decoder", "whole decode"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_an_exif_turned_jpeg_gives_the_crop_of_the_upright_image(tmp_path, monkeypatch, orientation, crop_decoder):
    """The box is drawn on the upright image and the same pixels are decoded from the stored one,
    then turned: exactly PIL's exif_transpose crop at full size, and within r/2 pixels at 1/r (the
    stored image's grid)."""
    if crop_decoder and not jpeg_crop.available():
        pytest.skip(f"no crop decoder: {jpeg_crop.missing}")
    if not crop_decoder:
        monkeypatch.setattr(jpeg_crop, "available", lambda: False)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "turned.JPEG"
    save_image_file(path, smooth_picture(403, 277), quality=95, exif=exif)
    upright = T.functional.pil_to_tensor(read_rgb(path))
    height, width = upright.shape[1:]
    for box in [(0, 0, height, width), (31, 17, 150, 211), (height - 45, width - 61, 45, 61)]:
        top, left, h, w = box
        expected = upright[:, top : top + h, left : left + w]
        pixels, (t, l, ph, pw), _ = decode.read_pixels(path, 1000, lambda *_, box=box: box)  # never reduced
        assert torch.equal(pixels[:, t : t + ph, l : l + pw], expected), (orientation, box)
        pixels, (t, l, ph, pw), _ = decode.read_pixels(path, 24, lambda *_, box=box: box)  # at 1/2 to 1/8
        reduced = F.interpolate(pixels[None, :, t : t + ph, l : l + pw].float(), size=(24, 24), mode="area")
        expected = F.interpolate(expected[None].float(), size=(24, 24), mode="area")
        assert mean_abs_difference(reduced, expected) < 5, (orientation, box)  # turned wrong: over 10


def test_a_reduced_decode_keeps_the_crop_at_least_size_pixels(tmp_path, monkeypatch):
    """A crop of at least 2, 4 or 8 times the output on each side is decoded at 1/2, 1/4 or 1/8,
    never to fewer pixels than the output, its edges within r/2 full-size pixels of the drawn box."""
    path, size = photo(tmp_path / "big.JPEG", 1600, 1200), 200
    drawn = []
    transform = FastRandomResizedCropFlip(size)
    box = transform.box
    monkeypatch.setattr(transform, "box", lambda h, w: drawn.append(box(h, w)) or drawn[-1])
    applied = AppliedBoxes(monkeypatch)
    applied.full_width = 1600
    torch.manual_seed(0)
    for _ in range(30):
        transform(path)
    for (top, left, h, w), (applied_box, r) in zip(drawn, applied):
        assert r == reduction((top, left, h, w), size)
        assert np.abs(edges(applied_box) - edges((top, left, h, w))).max() <= r / 2
        assert min(applied_box[2:]) >= r * size  # never fewer pixels than the output
    assert {r for _, r in applied} == {2, 4}  # crops of 400 to 1200 pixels a side


def same_seed(transform, source, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return transform(source)


def mean_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def pil_view(image: Image.Image, seed: int, size: int) -> torch.Tensor:
    """``data.decode=pil``'s training view for the seed's draws, of the box the fast path applies:
    on the reduced image's grid where the crop allows 1/r."""
    torch.manual_seed(seed)
    box = T.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3])
    flip = torch.rand(1) < 0.5  # RandomHorizontalFlip's draw, after the box's
    r = reduction(box, size)
    top, left, h, w = [v * r for v in decode.reduced_box(box, r)] if r > 1 else box
    crop = T.functional.resized_crop(image, top, left, h, w, [size, size], T.InterpolationMode.BICUBIC, antialias=True)
    tensor = T.functional.pil_to_tensor(crop)
    return tensor.flip(-1) if flip else tensor


@pytest.mark.parametrize(("w", "h", "bound"), [(500, 375, 0.5), (1800, 1350, 4.0)])
def test_the_output_matches_the_full_decode_for_the_same_draws(tmp_path, w, h, bound):
    """The same seed gives the same box and flip as ``data.decode=pil``; pixels differ by the
    resize kernel's rounding at full size (500 x 375 at 224: never reduced), and by libjpeg's DCT
    downscaling where the crop allows 1/2 or 1/4 (uint8 levels, mean absolute difference: about 3 on
    this grainy picture, under 1 on smooth ones)."""
    path = photo(tmp_path / "photo.JPEG", w, h)
    fast, image = RandomResizedCropFlip(224).per_file(), read_rgb(path)
    for seed in range(6):
        assert mean_abs_difference(same_seed(fast, path, seed), pil_view(image, seed, 224)) < bound
    if w == 500:  # never reduced: the pil path itself
        pil = RandomResizedCropFlip(224).per_image()
        assert all(mean_abs_difference(same_seed(fast, path, s), same_seed(pil, image, s)) < bound for s in range(6))
    evaluation = T.Compose([T.Resize(256, T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.PILToTensor()])
    assert mean_abs_difference(FastResizeCenterCrop(224, 256)(path), evaluation(image)) < bound


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


def test_without_the_crop_decoder_the_fast_path_says_so_and_decodes_whole_files(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(jpeg_crop, "available", lambda: False)
    monkeypatch.setattr(jpeg_crop, "missing", "_jpeg_crop.so was not built")
    with caplog.at_level("WARNING"):
        ImageFolderDataModule(str(make_tree(tmp_path)), decode="fast")
    assert "decodes whole JPEGs, not only their crops" in caplog.text and "_jpeg_crop.so was not built" in caplog.text
    monkeypatch.setattr(jpeg_crop, "decode", lambda *a: pytest.fail("the crop decoder was called"))
    path = photo(tmp_path / "photo.JPEG", 500, 375)
    fast = RandomResizedCropFlip(224).per_file()
    assert all(mean_abs_difference(same_seed(fast, path, s), pil_view(read_rgb(path), s, 224)) < 0.5 for s in range(4))


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


def test_a_file_s_bytes_give_what_its_path_gives(tmp_path):
    """data=shards hands the transform the bytes of each file as written; a cut-off one is refused
    as its file is."""
    fast = RandomResizedCropFlip(SIZE).per_file()
    for path in awkward_files(tmp_path):
        data = path.read_bytes()
        assert torch.equal(same_seed(fast, data, 3), same_seed(fast, path, 3)), path.name
        assert torch.equal(FastResizeCenterCrop(SIZE, 73)(data), FastResizeCenterCrop(SIZE, 73)(path)), path.name
    data = photo(tmp_path / "whole.JPEG", 500, 375).read_bytes()
    with pytest.raises(OSError):
        fast(data[: len(data) // 2])
