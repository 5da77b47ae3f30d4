"""data.decode=gpu's logic, run on the CPU: workers draw the crop from the header and keep the
bytes; the batch is decoded together, cropped and resized; what the device decoder cannot take
is finished by PIL in the worker."""

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from maelab.data.gpu_decode import CropFromHeader, EncodedBatch, collate_encoded, decode_batch
from maelab.data.samplers import sample_rng


def photo(path, w=120, h=90, **save):
    """A smooth picture (gradients and a disc), so resampling differences stay small."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / w, y * 255 / h, 128 + 100 * ((x - w / 2) ** 2 + (y - h / 2) ** 2 < 400)], -1)
    image = Image.fromarray(rgb.astype(np.uint8))
    image.save(path, **save)
    return path


def test_a_jpeg_stays_encoded_and_decodes_to_the_pil_path_s_crop(tmp_path):
    path = photo(tmp_path / "a.jpg", quality=95)
    view = CropFromHeader(32)
    with sample_rng(0, 1, 7):
        sample = view(path)
    assert not sample.done and sample.data.dim() == 1 and sample.data.numel() == path.stat().st_size
    with sample_rng(0, 1, 7):  # the same draws: the same box
        assert view(path).box == sample.box
    top, left, h, w = sample.box
    assert 0.2 * 120 * 90 * 0.9 <= h * w <= 120 * 90 and top + h <= 90 and left + w <= 120
    ours = decode_batch(EncodedBatch([sample], torch.tensor([3])), 32, torch.device("cpu"))[0]
    pil = T.functional.resized_crop(Image.open(path).convert("RGB"), top, left, h, w, [32, 32],
                                    T.InterpolationMode.BICUBIC, antialias=True)  # fmt: skip
    pil = T.functional.pil_to_tensor(pil)
    pil = pil.flip(-1) if sample.flip else pil
    assert ours.shape == (3, 32, 32) and (ours.float() - pil.float()).abs().mean() < 3.0


def test_files_the_device_cannot_decode_are_finished_in_the_worker_and_batched_in_place(tmp_path):
    files = [
        photo(tmp_path / "plain.jpg"),
        photo(tmp_path / "p.png"),  # not a JPEG
        tmp_path / "cmyk.jpg",
        tmp_path / "rotated.jpg",
        photo(tmp_path / "gray.jpg"),
    ]
    Image.open(files[0]).convert("CMYK").save(files[2])
    rotated = Image.open(files[0])
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(files[3], exif=exif)
    Image.open(files[4]).convert("L").save(files[4])
    view = CropFromHeader(24)
    torch.manual_seed(0)
    samples = [view(f) for f in files]
    assert [s.done for s in samples] == [False, True, True, True, False]
    assert samples[3].box[2] <= 120 and samples[3].box[3] <= 90  # drawn on the upright (90 x 120) image
    batch = collate_encoded([(s, i) for i, s in enumerate(samples)])
    images = decode_batch(batch, 24, torch.device("cpu"))
    assert images.shape == (5, 3, 24, 24) and images.dtype == torch.uint8
    assert torch.equal(images[1], samples[1].data) and batch.labels.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(images[4][0], images[4][1])  # a grayscale JPEG comes out as equal RGB planes


def test_the_boxes_drawn_from_headers_are_torchvision_s_on_the_decoded_image(tmp_path):
    """Drawn from the header's size (turned for an EXIF-rotated file), each box is the one
    torchvision's RandomResizedCrop draws on the decoded, upright image under the same seed."""
    from maelab.data.files import read_rgb

    plain = photo(tmp_path / "plain.jpg")
    rotated = tmp_path / "rotated.jpg"
    exif = Image.open(plain).getexif()
    exif[0x0112] = 6
    Image.open(plain).save(rotated, exif=exif)
    view = CropFromHeader(32)
    for path in (plain, rotated):
        upright = T.functional.pil_to_tensor(read_rgb(path))
        for i in range(50):
            with sample_rng(5, 0, i):
                ours = view(path).box
            with sample_rng(5, 0, i):
                assert ours == tuple(T.RandomResizedCrop.get_params(upright, [0.2, 1.0], [3 / 4, 4 / 3]))


def test_the_image_folder_module_hands_encoded_batches_and_decodes_them_on_the_device(tmp_path, monkeypatch):
    """The wiring, with the CPU standing in for the device: every file of the tree (gray, CMYK,
    PNG-named-.JPEG, rotated, truncated) comes out as a training image of the right size, or as
    the one-line error a bad file gets on every path."""
    import pytest

    from maelab.data.imagenet import ImageFolderDataModule
    from maelab.data.transforms import RandomResizedCropFlip
    from maelab.errors import UserError
    from tests.conftest import corrupt_one_file, make_tree

    tree = make_tree(tmp_path / "tree")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, wherever the test runs
    with pytest.raises(UserError, match="data.decode=gpu decodes JPEGs on the GPU and this machine has no CUDA"):
        ImageFolderDataModule(str(tree), decode="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    dm = ImageFolderDataModule(str(tree), img_size=24, batch_size=22, num_workers=0, pin_memory=False, decode="gpu")
    dm.train_transform = RandomResizedCropFlip(24).per_device()
    dm.setup()
    images, labels = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert images.shape == (22, 3, 24, 24) and images.dtype == torch.uint8 and sorted(labels.unique()) == [0, 1, 2]
    assert images.float().std() > 10  # pictures, not blank
    corrupt_one_file(tree)
    dm = ImageFolderDataModule(str(tree), img_size=24, batch_size=23, num_workers=0, pin_memory=False, decode="gpu")
    dm.train_transform = RandomResizedCropFlip(24).per_device()
    dm.setup()
    with pytest.raises(UserError, match=r"broken.JPEG: cannot be read as an image"):
        dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)


def test_a_jpeg_truncated_after_its_header_is_reported_and_its_place_filled(tmp_path):
    whole = photo(tmp_path / "whole.jpg")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[:1500])  # the header and a little of the scan
    view = CropFromHeader(16)
    batch = collate_encoded([(view(whole), 0), (view(cut), 1)], keep_size=True)
    assert not batch.samples[1].done  # its header reads: it travels encoded
    images = decode_batch(batch, 16, torch.device("cpu"))
    assert [bad.path for bad in batch.bad] == [str(cut)] and torch.equal(images[1], images[0])
    assert batch.labels.tolist() == [0, 0]  # the copy carries its label


def test_a_batch_of_which_nothing_decodes_is_none_for_the_caller_to_name(tmp_path):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(photo(tmp_path / "whole.jpg").read_bytes()[:1500])
    batch = collate_encoded([(CropFromHeader(16)(cut), 0)], keep_size=True)
    assert decode_batch(batch, 16, torch.device("cpu")) is None and len(batch.bad) == 1
