"""A mistyped override key or group option ends in one line naming the closest that exist."""

import hydra._internal.utils as hydra_utils
import pytest
from omegaconf import OmegaConf

from maelab.commands.train import mistyped_overrides_reported
from maelab.config import compose
from maelab.config.overrides import key_hint, override_error_message
from tests.conftest import maelab

CONFIG = OmegaConf.create(
    {
        "task": {"mask_ratio": 0.75, "masking": "random", "base_lr": 1e-3, "model": "${model}"},
        "model": {"embed_dim": 192, "depth": 12},
        "trainer": {"max_epochs": 1, "max_steps": -1},
        "seed": 0,
    }
)


@pytest.mark.parametrize(
    "path,missing,hint",
    [
        ("task", "mask_ration", "did you mean task.mask_ratio?"),
        ("trainer", "max_epoch", "did you mean trainer.max_epochs?"),
        ("", "sed", "did you mean seed?"),
        ("", "tsk.mask_ratio", "did you mean task.mask_ratio?"),  # the parent misspelt: whole paths compared
        ("", "modle.embed_dim", "did you mean model.embed_dim?"),
    ],
)
def test_the_closest_existing_key_is_named(path, missing, hint):
    node = OmegaConf.select(CONFIG, path) if path else CONFIG
    assert key_hint(node, path, missing) == hint


def test_without_a_close_key_the_keys_that_exist_are_listed():
    assert (
        key_hint(CONFIG.task, "task", "zzz")
        == "no close match; the keys under task are: base_lr, mask_ratio, masking, model"
    )
    assert key_hint(CONFIG, "", "zzz") == "no close match; the keys at the top level are: model, seed, task, trainer"
    wide = OmegaConf.create({f"key_{i:02d}": i for i in range(20)})
    assert key_hint(wide, "", "zzz").endswith("key_10, key_11 and 8 more")


def test_an_interpolation_is_not_a_path_to_suggest():
    """``task.model: ${model}`` cannot be set through: ``tsk.model.embed_dim`` has no close key."""
    assert key_hint(CONFIG, "", "tsk.model.embed_dim").startswith("no close match")


def error_of(overrides: list[str]) -> Exception:
    with pytest.raises(Exception) as raised:
        compose(overrides)
    return raised.value


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["+experiment=quickstart", "task.mask_ration=0.5"],
            "task.mask_ration=0.5: no such key; did you mean task.mask_ratio? "
            "(to add a new key: +task.mask_ration=0.5)",
        ),
        (["callbacks.knn_monitor.every_n_epoch=5"], "did you mean callbacks.knn_monitor.every_n_epochs?"),
        (["tsk.mask_ratio=0.5"], "tsk.mask_ratio=0.5: no such key; did you mean task.mask_ratio?"),
        (
            ["task=linprob"],
            "task=linprob: no such option; did you mean linprobe? (options: finetune, linprobe, pretrain, scratch)",
        ),
        (["+experiment=quikstart"], "+experiment=quikstart: no such option; did you mean quickstart? (options: "),
    ],
)
def test_hydra_s_composition_error_becomes_one_line(overrides, message):
    assert message in override_error_message(error_of(overrides), overrides)


@pytest.mark.parametrize("overrides", [["~task.mask_ration"], ["task.mask_ratio=[1"], ["task.model.embed_dimm=3"]])
def test_other_errors_are_left_to_hydra(overrides):
    assert override_error_message(error_of(overrides), overrides) is None
    assert override_error_message(ValueError("task.mask_ration"), overrides) is None


def test_hydra_s_reporter_is_wrapped_only_for_the_call():
    hydra_run_and_report = hydra_utils.run_and_report
    with pytest.raises(RuntimeError), mistyped_overrides_reported([]):
        assert hydra_utils.run_and_report is not hydra_run_and_report
        raise RuntimeError
    assert hydra_utils.run_and_report is hydra_run_and_report


def one_line_error(done) -> str:
    """The single line of stderr, which must be maelab's error and exit status."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "HYDRA_FULL_ERROR" not in done.stderr and "Traceback" not in done.stderr
    return lines[0]


@pytest.mark.parametrize(
    "override,suggested",
    [
        ("task.mask_ration=0.5", "did you mean task.mask_ratio?"),
        ("trainer.max_epoch=3", "did you mean trainer.max_epochs?"),
        ("callbacks.knn_monitor.every_n_epoch=5", "did you mean callbacks.knn_monitor.every_n_epochs?"),
        ("data.batchsize=8", "did you mean data.batch_size?"),
        ("sed=1", "did you mean seed?"),
        ("tsk.mask_ratio=0.5", "did you mean task.mask_ratio?"),
        ("task=linprob", "did you mean linprobe?"),
        ("model=vit_tini", "did you mean vit_tiny?"),
    ],
)
def test_a_mistyped_override_ends_in_one_line_naming_the_closest(tmp_path, override, suggested):
    line = one_line_error(maelab("train", "+experiment=quickstart", override, "--cfg", "job", cwd=tmp_path))
    assert line.startswith(f"error: {override}: no such ") and suggested in line


def test_the_exact_message(tmp_path):
    done = maelab("train", "+experiment=quickstart", "task.mask_ration=0.5", "--cfg", "job", cwd=tmp_path)
    assert one_line_error(done) == (
        "error: task.mask_ration=0.5: no such key; did you mean task.mask_ratio? "
        "(to add a new key: +task.mask_ration=0.5)"
    )


def test_a_mistyped_experiment_names_the_closest(tmp_path):
    line = one_line_error(maelab("train", "+experiment=quikstart", "--cfg", "job", cwd=tmp_path))
    assert line.startswith("error: +experiment=quikstart: no such option; did you mean quickstart? (options: ")
    assert "_imagenet_mae" not in line  # the shared bases are not experiments to run


@pytest.mark.parametrize(
    "sweep,suggested",
    [
        ("task.mask_ration=0.5,0.9", "did you mean task.mask_ratio?"),
        ("task=linprob,linprobee", "did you mean linprobe?"),
    ],
)
def test_a_multirun_reports_the_same_way_before_any_job_runs(tmp_path, sweep, suggested):
    done = maelab("train", "-m", "+experiment=quickstart", sweep, f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert suggested in one_line_error(done)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_hydra_s_other_errors_and_full_error_stay_hydra_s(tmp_path):
    done = maelab("train", "+experiment=quickstart", "~task.mask_ration", "--cfg", "job", cwd=tmp_path)
    assert done.returncode == 1 and "Could not delete from config. 'task.mask_ration' does not exist." in done.stderr
    full = maelab(
        "train", "+experiment=quickstart", "sed=1", "--cfg", "job", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"}
    )
    assert full.returncode == 1 and "Traceback" in full.stderr and "Could not override 'sed'" in full.stderr
