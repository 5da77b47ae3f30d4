"""OmegaConf resolvers used by maelab's configs, registered before any config is resolved."""

from omegaconf import DictConfig, OmegaConf


def runs_on_gpu(trainer_cfg: DictConfig) -> bool:
    """Whether the trainer config will train on a CUDA GPU (``accelerator: auto`` picks one if present)."""
    import torch

    return trainer_cfg.get("accelerator", "auto") in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def on_gpu(gpu_value, cpu_value, *, _root_: DictConfig):
    """``${on_gpu:A,B}``: A when the run trains on a GPU, else B. For hardware settings such as
    the per-device batch, which a recipe sets for the GPU it was tuned on but a CPU cannot hold;
    the effective batch (and so the learning rate) stays the recipe's through accumulation."""
    return gpu_value if runs_on_gpu(_root_.trainer) else cpu_value


def heads(width, head_dim):
    """``${heads:WIDTH,HEAD_DIM}``: the number of attention heads of a given size that make up a
    width, so a width sweep keeps the head size fixed (the official decoder: 512 / 32 = 16)."""
    from maelab.errors import UserError

    width, head_dim = int(width), int(head_dim)
    if width % head_dim:
        raise UserError(
            f"${{heads:{width},{head_dim}}}: a width of {width} is not a whole number of {head_dim}-wide attention "
            f"heads; choose a width divisible by {head_dim} (e.g. {max(1, width // head_dim) * head_dim})"
        )
    return width // head_dim


def slurm_count(value, key):
    """``${slurm_count:${trainer.devices},trainer.devices}``: a trainer count SLURM can be asked
    for. ``-1`` or ``auto`` (all visible GPUs) means nothing before the job has a node.

    Hydra resolves the launcher in its own process, outside any maelab job and its error
    handling, so the refusal ends the command here with its message alone."""
    from maelab.errors import fail

    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    fail(
        f"hydra.launcher: {key}={value}: SLURM must be asked for a number of nodes and GPUs per node; set "
        f"{key} to a positive integer, e.g. trainer=multinode trainer.num_nodes=1 trainer.devices=8"
    )


def register_resolvers() -> None:
    for name, resolver in (("on_gpu", on_gpu), ("heads", heads), ("slurm_count", slurm_count)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
