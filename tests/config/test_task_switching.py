"""Switching the task of an experiment (``task=linprobe`` on a pretraining recipe, ``task=pretrain``
on a classifier's): a valid run, or one line naming the experiment to use before anything is
built; never a TypeError from Hydra's instantiate. And the quickstart's chain on synthetic data,
pretrain -> linear probe -> fine-tune -> export, which those lines point to."""

import json

import pytest
import timm
import torch

from maelab.config.checks import validate
from maelab.errors import ConfigError
from maelab.run.fit import run
from tests.conftest import compose_config, maelab


def decoder(asked: str) -> str:
    return (
        f"task.decoder_width, task.decoder_depth, task.decoder_heads are settings of task=pretrain, not of task={asked}"
    )


PRETRAINING_CALLBACKS = (
    "callbacks.reconstructions draws MAE reconstructions; callbacks.knn_monitor monitors MAE pretraining"
)
BEST_BY_ACC = "callbacks.best_checkpoint keeps the epoch of best val/acc1"
FROM_A_RUN = "task.pretrained=<run>/checkpoints/last.ckpt"
QUICKSTART_TO_PROBE = (
    "task=linprobe does not fit +experiment=quickstart, a task=pretrain recipe "
    f"({decoder('linprobe')}; {PRETRAINING_CALLBACKS}); use +experiment=quickstart_linprobe {FROM_A_RUN}"
)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["+experiment=quickstart", "task=linprobe"], QUICKSTART_TO_PROBE),
        (
            ["+experiment=quickstart", "task=finetune"],
            f"task=finetune does not fit +experiment=quickstart, a task=pretrain recipe ({decoder('finetune')}; "
            f"{PRETRAINING_CALLBACKS}); use +experiment=quickstart_finetune {FROM_A_RUN}",
        ),
        (
            ["+experiment=quickstart", "task=scratch"],
            f"task=scratch does not fit +experiment=quickstart, a task=pretrain recipe ({decoder('scratch')}; "
            f"{PRETRAINING_CALLBACKS}); use +experiment=quickstart_scratch",
        ),
        (  # no scratch recipe of this size: its fine-tuning from random weights
            ["+experiment=mae_vitb", "task=scratch"],
            "task=scratch does not fit +experiment=mae_vitb, a task=pretrain recipe (callbacks.reconstructions "
            "draws MAE reconstructions); use +experiment=finetune_vitb task=scratch",
        ),
        (  # the user's second try: the classifier's callbacks, the decoder settings still there
            ["+experiment=quickstart", "task=linprobe", "callbacks=classifier"],
            f"task=linprobe does not fit +experiment=quickstart, a task=pretrain recipe ({decoder('linprobe')}; "
            f"callbacks.reconstructions draws MAE reconstructions); use +experiment=quickstart_linprobe {FROM_A_RUN}",
        ),
        (
            ["+experiment=mae_vitt_cifar10", "task=finetune"],
            f"task=finetune does not fit +experiment=mae_vitt_cifar10, a task=pretrain recipe ({decoder('finetune')}; "
            f"{PRETRAINING_CALLBACKS}); use +experiment=finetune_vitt_cifar10 {FROM_A_RUN} "
            "(or +experiment=finetune_vitt_cifar10_writeup, finetune_vitt_cifar10_fast)",
        ),
        (  # the ImageNet recipes write no decoder settings: the callbacks give it away
            ["+experiment=mae_vitb", "task=linprobe"],
            "task=linprobe does not fit +experiment=mae_vitb, a task=pretrain recipe (callbacks.reconstructions "
            f"draws MAE reconstructions); use +experiment=linprobe_vitb {FROM_A_RUN}",
        ),
        (
            ["+experiment=finetune_vitt_cifar10", "task=pretrain"],
            "task=pretrain does not fit +experiment=finetune_vitt_cifar10, a task=finetune recipe (task.layer_decay, "
            f"task.drop_path_rate are settings of task=finetune, not of task=pretrain; {BEST_BY_ACC}); "
            "use +experiment=mae_vitt_cifar10 "
            "(or +experiment=mae_vitt_cifar10_fast)",
        ),
        (  # no task setting of its own: only the best-epoch checkpoint does not fit
            ["+experiment=linprobe_vitt_cifar10", "task=pretrain"],
            f"task=pretrain does not fit +experiment=linprobe_vitt_cifar10, a task=linprobe recipe ({BEST_BY_ACC}); "
            "use +experiment=mae_vitt_cifar10 (or +experiment=mae_vitt_cifar10_fast)",
        ),
        (
            ["+experiment=quickstart_linprobe", "task=pretrain"],
            "task=pretrain does not fit +experiment=quickstart_linprobe, a task=linprobe recipe (task.optimizer is a "
            f"setting of task=linprobe, not of task=pretrain; {BEST_BY_ACC}); use +experiment=quickstart",
        ),
    ],
)
def test_a_task_switched_away_from_its_experiment_stops_naming_the_experiment_to_use(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as error:
        run(compose_config(overrides, tmp_path / "run"))
    assert str(error.value) == message
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # stopped before anything was built or written


def test_the_suggestion_passes_on_the_checkpoint_given(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    ckpt.touch()
    overrides = ["+experiment=quickstart", "task=linprobe", f"task.pretrained={ckpt}", "+task.foo=1"]
    with pytest.raises(ConfigError) as error:
        validate(compose_config(overrides, tmp_path))
    assert str(error.value) == (
        "task=linprobe does not fit +experiment=quickstart, a task=pretrain recipe "
        f"({decoder('linprobe')}; task.foo (from the command line) cannot go with task=linprobe; "
        f"{PRETRAINING_CALLBACKS}); use +experiment=quickstart_linprobe task.pretrained={ckpt}"
    )


@pytest.mark.parametrize(
    "overrides,freeze_encoder,pretrained",
    [  # one classifier task for another: the same constructor, the same callbacks
        (["+experiment=quickstart_linprobe", "task=finetune"], False, "given"),
        (["+experiment=quickstart_finetune", "task=linprobe"], True, "given"),
        (["+experiment=quickstart_finetune", "task=scratch"], False, None),
        (["+experiment=linprobe_vitt_cifar10", "task=finetune"], False, "given"),
        (["+experiment=scratch_vitt_cifar10", "task=linprobe", "task.pretrained=given"], True, "given"),
    ],
)
def test_a_switch_between_classifier_tasks_is_a_valid_run(tmp_path, overrides, freeze_encoder, pretrained):
    (tmp_path / "given").touch()
    if pretrained and not any(o.startswith("task.pretrained=") for o in overrides):
        overrides = [*overrides, "task.pretrained=given"]
    cfg = compose_config(overrides, tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        validate(cfg)
    assert cfg.task.freeze_encoder is freeze_encoder and cfg.task.pretrained == pretrained


@pytest.mark.parametrize(
    "overrides,problems",
    [  # no task switched: each setting that does not fit is one problem of the usual list
        (
            ["+experiment=quickstart", "task._target_=maelab.modules.nope.Task"],
            [
                "task._target_=maelab.modules.nope.Task: expected an importable class (Are you sure that 'nope' is "
                "importable from module 'maelab.modules'?)"
            ],
        ),
        (
            ["+experiment=quickstart", "+task.foo=1"],
            ["task.foo: not a setting of PretrainModule; drop it with ~task.foo"],
        ),
        (
            ["+experiment=quickstart_linprobe", "task.pretrained=null", "callbacks=default"],
            [
                "callbacks.reconstructions: draws MAE reconstructions, and this task classifies; choose "
                "callbacks=classifier (the classifier experiments do) or drop it with ~callbacks.reconstructions",
                "callbacks.knn_monitor: monitors MAE pretraining, and this task classifies; choose "
                "callbacks=classifier (the classifier experiments do) or drop it with ~callbacks.knn_monitor",
            ],
        ),
        (
            ["+experiment=quickstart", "callbacks=classifier", "data.val_size=256"],
            [
                "callbacks.best_checkpoint: keeps the epoch of best val/acc1, and PretrainModule chooses its best "
                "epoch by val/loss; drop it with ~callbacks.best_checkpoint (callbacks=default has none)"
            ],
        ),
    ],
)
def test_a_setting_the_task_cannot_take_is_a_problem_with_its_fix(tmp_path, overrides, problems):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(overrides, tmp_path))
    assert str(error.value) == "invalid configuration:\n  " + "\n  ".join(problems)


def test_the_quickstart_stages_share_its_encoder_and_data(tmp_path):
    """What makes the quickstart's checkpoint load into its probe and fine-tuning, and what the
    suggestions above match on."""
    pretrain, *classifiers = (
        compose_config([f"+experiment={name}"], tmp_path)
        for name in ("quickstart", "quickstart_linprobe", "quickstart_finetune")
    )
    for cfg in classifiers:
        assert cfg.model == pretrain.model and cfg.data._target_ == pretrain.data._target_
        assert cfg.data.val_size > 0 and cfg.task._target_ == "maelab.modules.classifier.ClassifierModule"


def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path):
    done = maelab("train", "+experiment=quickstart", "task=linprobe", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.rstrip().splitlines()[-1] == f"error: {QUICKSTART_TO_PROBE}"
    assert [line for line in done.stderr.splitlines() if "error" in line.lower()] == [f"error: {QUICKSTART_TO_PROBE}"]
    assert "Traceback" not in done.stderr and not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_the_quickstart_chain_pretrains_probes_fine_tunes_and_exports_for_timm(tmp_path):
    """The README's chain without a dataset, shrunk: each stage one command on the last one's
    last.ckpt; the probe beats chance (0.10) by far, and timm's model of the export scores the
    test split as the fine-tuned run did."""
    from maelab.data.synthetic import make_shapes
    from maelab.data.transforms import model_input

    stages = {  # the probe on all 1,792 training images, where it reaches its accuracy within a few epochs
        "pre": ["+experiment=quickstart", "data.num_train=1024", "trainer.max_epochs=3", "callbacks.knn_monitor=null"],
        "probe": ["+experiment=quickstart_linprobe", "trainer.max_epochs=6"],
        "finetune": ["+experiment=quickstart_finetune", "data.num_train=512", "trainer.max_epochs=1"],
    }
    results = {}
    for stage, overrides in stages.items():
        pretrained = [] if stage == "pre" else [f"task.pretrained={tmp_path / 'pre' / 'checkpoints' / 'last.ckpt'}"]
        run_dir = f"hydra.run.dir={tmp_path / stage}"
        done = maelab("train", *overrides, *pretrained, "trainer.enable_progress_bar=false", run_dir, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        results[stage] = json.loads((tmp_path / stage / "results.json").read_text())
    assert results["probe"]["test"]["test/acc1"] > 0.25, results["probe"]["test"]  # chance: 0.10

    out = tmp_path / "vit.pth"
    done = maelab("export", str(tmp_path / "finetune" / "checkpoints" / "last.ckpt"), str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    meta = json.loads(out.with_suffix(".pth.json").read_text())
    model = timm.create_model(meta["timm_model"], pretrained=False, **meta["kwargs"]).eval()
    model.load_state_dict(torch.load(out), strict=True)
    images, labels = make_shapes(256, 32, 10, seed=1)  # the synthetic test split: data.seed + 1
    with torch.no_grad():
        predicted = model(model_input(images, [0.5] * 3, [0.25] * 3, 32)).argmax(1)
    accuracy = (predicted == labels).float().mean().item()
    assert accuracy == pytest.approx(results["finetune"]["test"]["test/acc1"], abs=1 / 256)
