"""Fine-tuning, linear probing and the checkpoints users already have (official MAE, timm)."""

import json

import pytest
import timm
import torch

from maelab.commands.export import export
from maelab.errors import UserError
from maelab.models.classifier import ViTClassifier
from maelab.models.mae import MaskedAutoencoder
from maelab.modules.optim import param_groups_layer_decay
from maelab.run.fit import run
from maelab.weights.pretrained import load_encoder, load_full
from tests.conftest import TINY, compose_config

SMALL = dict(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=4)

# A classifier of the same tiny encoder as TINY's pretraining, on synthetic data.
TINY_CLASSIFIER = [
    "data=synthetic",
    "data.num_train=256",
    "data.num_test=64",
    "data.val_size=64",
    "data.batch_size=32",
    "data.img_size=16",
    "data.num_workers=0",
    "model.patch_size=4",
    "model.embed_dim=32",
    "model.depth=1",
    "model.num_heads=2",
    "task.effective_batch_size=null",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
]


def official_state_dict(encoder: torch.nn.Module, decoder_width: int = 32, decoder_depth: int = 1) -> dict:
    """An official MAE pretraining state dict, written out key by key from the published layout:
    the encoder's tensors, then mask_token, decoder_pos_embed, decoder_embed, decoder_blocks,
    decoder_norm, decoder_pred (patch**2 * 3 outputs)."""
    g = torch.Generator().manual_seed(0)
    enc = encoder.state_dict()
    width, tokens = enc["cls_token"].shape[-1], enc["pos_embed"].shape[1]
    patch = enc["patch_embed.proj.weight"].shape[-1]
    sd = {k: enc[k].clone() for k in enc if not k.startswith(("head", "fc_norm"))}
    sd["mask_token"] = torch.randn(1, 1, decoder_width, generator=g)
    sd["decoder_pos_embed"] = torch.randn(1, tokens, decoder_width, generator=g)
    sd["decoder_embed.weight"] = torch.randn(decoder_width, width, generator=g)
    sd["decoder_embed.bias"] = torch.randn(decoder_width, generator=g)
    for i in range(decoder_depth):
        p = f"decoder_blocks.{i}."
        d, h = decoder_width, 4 * decoder_width
        for name, shape in [
            ("norm1.weight", (d,)),
            ("norm1.bias", (d,)),
            ("attn.qkv.weight", (3 * d, d)),
            ("attn.qkv.bias", (3 * d,)),
            ("attn.proj.weight", (d, d)),
            ("attn.proj.bias", (d,)),
            ("norm2.weight", (d,)),
            ("norm2.bias", (d,)),
            ("mlp.fc1.weight", (h, d)),
            ("mlp.fc1.bias", (h,)),
            ("mlp.fc2.weight", (d, h)),
            ("mlp.fc2.bias", (d,)),
        ]:
            sd[p + name] = torch.randn(*shape, generator=g) * 0.02
    sd["decoder_norm.weight"] = torch.ones(decoder_width)
    sd["decoder_norm.bias"] = torch.zeros(decoder_width)
    sd["decoder_pred.weight"] = torch.randn(patch * patch * 3, decoder_width, generator=g)
    sd["decoder_pred.bias"] = torch.randn(patch * patch * 3, generator=g)
    return sd


def timm_vit(**kwargs) -> torch.nn.Module:
    """A timm ViT with random (non-default) weights: the 'source' of an official checkpoint."""
    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_an_official_mae_file_gives_the_encoder_outputs_of_its_weights(tmp_path):
    source = timm_vit(num_classes=0, global_pool="token", **SMALL)
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": official_state_dict(source), "epoch": 799}, path)
    imgs = torch.randn(2, 3, 32, 32)

    probe = ViTClassifier(10, global_pool="token", **SMALL).eval()
    load_encoder(probe, path)
    mae = MaskedAutoencoder(**SMALL, decoder_width=32, decoder_depth=1, decoder_heads=4).eval()
    load_full(mae, path)
    with torch.no_grad():
        expected = source.forward_features(imgs)
        assert torch.allclose(probe.forward_features(imgs), expected, atol=1e-5)
        assert torch.allclose(mae.forward_features(imgs), expected, atol=1e-5)
    assert torch.equal(mae.decoder_pred.weight, torch.load(path)["model"]["decoder_pred.weight"])


def test_an_official_finetuned_file_fine_tunes_with_its_encoder(tmp_path):
    source = timm_vit(num_classes=10, global_pool="avg", **SMALL)  # has fc_norm and head, no norm
    path = tmp_path / "mae_finetuned.pth"
    torch.save({"model": source.state_dict()}, path)
    model = ViTClassifier(10, global_pool="avg", **SMALL).eval()
    load_encoder(model, path)
    for key, value in source.state_dict().items():
        if not key.startswith(("head", "fc_norm")):
            assert torch.equal(model.state_dict()[key], value), key


def test_a_position_embedding_of_another_grid_is_interpolated_and_says_so(tmp_path, caplog):
    source = timm_vit(num_classes=0, global_pool="token", **{**SMALL, "img_size": 16})  # 4x4 grid
    path = tmp_path / "small_grid.pth"
    torch.save({"model": official_state_dict(source)}, path)
    model = ViTClassifier(10, global_pool="token", **SMALL)  # 8x8 grid
    with caplog.at_level("INFO"):
        load_encoder(model, path)
    assert "pos_embed interpolated from 16 to 64 patches" in caplog.text
    assert torch.equal(model.pos_embed[:, 0], source.pos_embed[:, 0].detach())  # cls position kept
    corner = model.pos_embed[0, 1]  # bicubic on a grid keeps the smooth corner close to the source's
    assert torch.allclose(corner, source.pos_embed[0, 1].detach(), atol=0.1)


def test_a_checkpoint_of_another_size_names_the_first_mismatched_key(tmp_path):
    source = timm_vit(num_classes=0, **{**SMALL, "embed_dim": 96, "num_heads": 4})
    path = tmp_path / "wider.pth"
    torch.save({"model": official_state_dict(source)}, path)
    with pytest.raises(UserError, match=r"cls_token is \(1, 1, 96\) there, \(1, 1, 64\) in this model"):
        load_encoder(ViTClassifier(10, **SMALL), path)
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 64)}}, path)
    with pytest.raises(UserError, match="lacks encoder weight"):
        load_encoder(ViTClassifier(10, **SMALL), path)


@pytest.mark.parametrize(
    "pool,batchnorm,frozen", [("avg", False, False), ("token", False, False), ("token", True, True)]
)
def test_timm_layer_decay_groups_are_the_ones_maelab_checkpoints_hold(pool, batchnorm, frozen):
    # maelab grouped by hand before it used timm's helper; optimizer states in checkpoints follow
    # the groups' order, so a run started before still resumes: same groups, params, scales, order
    model = ViTClassifier(10, global_pool=pool, head_batchnorm=batchnorm, **SMALL)
    if frozen:
        for module in model.encoder_modules():
            module.requires_grad_(False)
        model.cls_token.requires_grad_(False)
    depth = len(model.blocks)

    def layer(name: str) -> int:
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            return 0
        return int(name.split(".")[1]) + 1 if name.startswith("blocks.") else depth + 1

    before: dict = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decays = not (p.ndim <= 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed"))
            group = before.setdefault((layer(name), decays), {"params": [], "weight_decay": 0.05 if decays else 0.0})
            group["lr_scale"] = 0.75 ** (depth + 1 - layer(name))
            group["params"].append(p)
    expected = [before[key] for key in sorted(before)]
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in g["params"]] for g in expected]
    for group, reference in zip(groups, expected, strict=True):
        assert (group["lr_scale"], group["weight_decay"]) == pytest.approx(
            (reference["lr_scale"], reference["weight_decay"])
        )


def test_layer_decay_scales_and_no_decay_sets():
    model = ViTClassifier(10, **SMALL)  # depth 3: layers 0..4
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    expected = {
        "cls_token": (0.5**4, 0.0),
        "patch_embed.proj.weight": (0.5**4, 0.05),
        "patch_embed.proj.bias": (0.5**4, 0.0),
        "pos_embed": (0.5**4, 0.0),
        "blocks.0.attn.qkv.weight": (0.5**3, 0.05),
        "blocks.0.norm1.weight": (0.5**3, 0.0),
        "blocks.2.mlp.fc2.weight": (0.5**1, 0.05),
        "blocks.2.mlp.fc2.bias": (0.5**1, 0.0),
        "fc_norm.weight": (1.0, 0.0),
        "head.weight": (1.0, 0.05),
        "head.bias": (1.0, 0.0),
    }
    for name, (scale, wd) in expected.items():
        group = by_param[id(named[name])]
        assert (group["lr_scale"], group["weight_decay"]) == pytest.approx((scale, wd)), name
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """A short TINY pretraining run's last.ckpt (k-NN monitor every epoch)."""
    out = tmp_path_factory.mktemp("pretrain")
    results = run(compose_config(TINY + ["trainer.max_epochs=3", "callbacks.knn_monitor.every_n_epochs=1"], out))
    assert 0.0 <= results["last"]["val/knn_acc"] <= 1.0
    return results["last_checkpoint"]


def test_loading_a_pretraining_checkpoint_gives_bit_identical_encoder_weights(pretrained, tmp_path):
    cfg = compose_config(
        ["+experiment=finetune_vitt_cifar10", *TINY_CLASSIFIER, f"task.pretrained={pretrained}"], tmp_path
    )
    from maelab.run.build import build

    _, module, _ = build(cfg)
    module.load_initial_weights()  # what a fresh run does (a resumed one takes its own checkpoint)
    source = torch.load(pretrained, weights_only=False)["state_dict"]
    encoder = {k: v for k, v in module.model.state_dict().items() if not k.startswith(("head", "fc_norm"))}
    assert encoder and all(torch.equal(v, source[f"model.{k}"]) for k, v in encoder.items())


def test_a_linear_probe_changes_the_head_only_and_beats_chance(pretrained, tmp_path):
    cfg = compose_config(
        ["+experiment=linprobe_vitt_cifar10", *TINY_CLASSIFIER, f"task.pretrained={pretrained}"]
        # LARS moves each weight by lr x 0.001 of its norm a step, so a probe of a few hundred steps
        # needs a high lr and a head that does not start near zero
        + ["data.batch_size=16", "trainer.max_epochs=20", "task.warmup_epochs=2", "task.base_lr=200"]
        + ["task.head_init_std=0.3", "augment=none"],
        tmp_path,
    )
    results = run(cfg)
    after = torch.load(results["last_checkpoint"], weights_only=False)["state_dict"]
    before = torch.load(pretrained, weights_only=False)["state_dict"]
    encoder_keys = [k for k in after if not k.startswith(("model.head", "model.fc_norm"))]
    assert all(torch.equal(after[k], before[k]) for k in encoder_keys)
    assert results["global_step"] == 20 * (192 // 16)
    # ... while the head learns: 10 classes, chance is 0.1 (a probe fitted to convergence: 0.4)
    assert results["best"]["val/acc1"] > 0.2
    assert results["test"]["test/acc1"] > 0.2
    assert json.loads((tmp_path / "results.json").read_text())["val_split"] == "64 held-out training images"


def test_partial_fine_tuning_trains_only_the_last_blocks(tmp_path):
    cfg = compose_config(
        ["+experiment=scratch_vitt_cifar10", *TINY_CLASSIFIER, "model.depth=3", "task.trainable_blocks=1"], tmp_path
    )
    from maelab.run.build import build

    _, module, _ = build(cfg)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    module.train()
    assert not module.model.blocks[1].training and module.model.blocks[2].training  # no drop path when frozen
    assert trainable == {
        n for n, _ in module.model.named_parameters() if n.startswith(("blocks.2.", "fc_norm", "head"))
    }


def test_export_loads_into_timm_strictly_with_the_same_features(pretrained, tmp_path):
    imgs = torch.randn(3, 3, 16, 16)
    for pool in ("token", "avg"):
        out = tmp_path / f"encoder_{pool}.pth"
        meta = export(pretrained, str(out), global_pool=pool)
        assert meta["kwargs"]["num_classes"] == 0
        theirs = timm.create_model(meta["timm_model"], pretrained=False, **meta["kwargs"]).eval()
        theirs.load_state_dict(torch.load(out), strict=True)
        # maelab's view of the same export: the encoder, pooled the same way; with average
        # pooling the encoder's final norm is the norm after pooling
        ours = ViTClassifier(2, global_pool=pool, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2).eval()
        load_encoder(ours, pretrained)
        if pool == "avg":
            state = torch.load(pretrained, weights_only=False)["state_dict"]
            ours.fc_norm.load_state_dict({"weight": state["model.norm.weight"], "bias": state["model.norm.bias"]})
        with torch.no_grad():
            expected = ours.features(imgs)
            assert torch.allclose(
                theirs.forward_head(theirs.forward_features(imgs), pre_logits=True), expected, atol=1e-5
            )


def test_export_of_a_probe_folds_its_batchnorm_and_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = ViTClassifier(10, global_pool="token", head_batchnorm=True, head_init_std=0.01, **SMALL).eval()
    bn = model.head[0]
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "probe.pth"
    torch.save({"model": model.state_dict()}, path)
    meta = export(str(path), str(tmp_path / "timm.pth"), num_heads=4)
    assert meta["kwargs"]["num_classes"] == 10
    theirs = timm.create_model(meta["timm_model"], pretrained=False, **meta["kwargs"]).eval()
    theirs.load_state_dict(torch.load(tmp_path / "timm.pth"), strict=True)
    imgs = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(theirs(imgs), model(imgs), atol=1e-4)


def test_knn_voting_finds_clusters_and_weights_close_neighbours():
    from maelab.callbacks.knn_monitor import knn_accuracy

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    train_labels = torch.arange(400) % 4
    train = centres[train_labels] + torch.randn(400, 16, generator=g)
    query_labels = torch.arange(100) % 4
    query = centres[query_labels] + torch.randn(100, 16, generator=g)
    assert knn_accuracy(train, train_labels, query, query_labels, num_classes=4, chunk=7) == 1.0
    shuffled = train_labels[torch.randperm(400, generator=g)]
    assert knn_accuracy(train, shuffled, query, query_labels, num_classes=4) < 0.5  # chance 0.25
    # one exact neighbour of class 1 outvotes 19 far ones of class 0 at temperature 0.07
    bank = torch.cat([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]).repeat(19, 1)])
    labels = torch.tensor([1] + [0] * 19)
    assert knn_accuracy(bank, labels, torch.tensor([[1.0, 0.2]]), torch.tensor([1]), num_classes=2) == 1.0


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


def test_lars_steps_weight_matrices_by_trust_ratio_and_biases_plainly():
    """The official LARS update: a weight matrix moves by lr x 0.001 x |w| / |g| x g (momentum
    aside), a bias by lr x g."""
    from timm.optim import Lars

    from maelab.modules.optim import lars_groups, param_groups_weight_decay

    head = torch.nn.Linear(3, 2)
    w, b = head.weight, head.bias
    with torch.no_grad():
        w.fill_(2.0), b.zero_()
    w.grad, b.grad = torch.full((2, 3), 0.5), torch.tensor([1.0, -1.0])
    Lars(lars_groups(param_groups_weight_decay(head, 0.0)), lr=10.0, momentum=0.9, trust_coeff=0.001).step()
    trust = 0.001 * (2.0 * 6**0.5) / (0.5 * 6**0.5)
    assert torch.allclose(w.detach(), torch.full((2, 3), 2.0 - 10.0 * trust * 0.5))
    assert torch.allclose(b.detach(), torch.tensor([-10.0, 10.0]))


def test_a_resumed_classifier_does_not_need_its_pretrained_file(pretrained, tmp_path):
    import shutil

    copy = tmp_path / "moved_later.ckpt"
    shutil.copy(pretrained, copy)
    base = ["+experiment=linprobe_vitt_cifar10", *TINY_CLASSIFIER, f"task.pretrained={copy}", "augment=none"]
    run(compose_config(base + ["trainer.max_epochs=1"], tmp_path / "run"))
    copy.unlink()
    results = run(compose_config(base + ["trainer.max_epochs=2", "ckpt_path=last"], tmp_path / "run"))
    assert results["epochs"] == 2 and results["best"]["epoch"] in (0, 1)
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()
