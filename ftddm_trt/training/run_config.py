"""What defines a training run and the helpers every trainer of a run folder shares.

``TrainConfig`` is saved in every checkpoint; ``resumed_config`` checks a resume against it.
``training.trainer`` (UNet, flow, regression, flow enhancer), ``training.tdpm`` (the TDPM generator) and
``training.munet`` (the MUNet-FS-cWGAN baseline) build on this module, so none imports another for it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftddm_trt.constants import MARGIN_WEIGHT, T_DIFFUSION, T_TRUNC
from ftddm_trt.data.phantom import fold_split, generate_dataset
from ftddm_trt.data.phantom_styles import get_style
from ftddm_trt.data.training_folder import read_training_folder, split_subjects
from ftddm_trt.models.io import save_model

TASKS = ("unet", "unet_full", "flow", "tdpm", "regression", "munet", "flow_enhancer")
#: Tasks trained adversarially by their own loop (a generator and a critic / discriminator).
ADVERSARIAL_TASKS = ("tdpm", "munet")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint)."""

    task: str = "unet"
    preset: str = "cpu"
    iterations: int = 20_000
    batch_size: int = 8
    lr: float = 1e-4
    lr_final: float = 1e-5  # exponential decay per iteration from lr to lr_final
    t_trunc: int = T_TRUNC
    n_subjects: int = 25
    data_seed: int = 0
    fold: int = 0
    seed: int = 0
    lr_protocol_fraction: float = 0.5
    #: Loss weight of the voxels of M outside the truth's quality mask (``training.objectives``; 1: the paper's
    #: loss over all of M). A run saved before this option existed resumes with 1 (``resumed_config``).
    margin_weight: float = MARGIN_WEIGHT
    val_every: int = 500
    val_examples: int = 64
    ckpt_every: int = 100
    flow_lambda: float = 10.0
    flow_alpha: float = 0.84
    grad_clip: float = 1.0
    #: Phantom styles (``data.phantom_styles``), assigned to subjects round-robin.
    styles: tuple[str, ...] = ("classic",)
    #: A site's own high-resolution subjects (``data.training_folder``) instead of phantoms.
    data_dir: str | None = None
    #: Subjects of ``data_dir`` held out for validation (at least one).
    val_subjects: int = 2
    gan_l1: float = 10.0  # tdpm: weight of the generator's centre L1 term
    #: munet: weight of the adversarial (Wasserstein) term against the pixel loss.
    gan_adv: float = 0.01
    #: munet: weight of the critic's gradient penalty (WGAN-GP's 10).
    gan_gp: float = 10.0
    #: munet: critic updates per generator update (each on the step's batch, a fresh interpolation).
    critic_steps: int = 1
    #: flow_enhancer: the trained MUNet it enhances (a munet run folder, a model folder, or NAME.safetensors).
    munet: str | None = None
    #: Decay of an exponential moving average of the weights (0: none). With it, validation scores and
    #: ``best.*`` holds the averaged weights, as DDPM (0.9999) and improved-diffusion sample with them;
    #: ``last/`` keeps the raw weights and the average (``ema.safetensors``) for resuming.
    ema: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        self.styles = tuple(self.styles)
        for name in self.styles:
            get_style(name)
        if not 0.0 <= self.margin_weight <= 1.0:
            raise ValueError(f"--margin-weight must be in [0, 1], got {self.margin_weight}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"--ema must be in [0, 1), got {self.ema}")
        if self.ema and self.task in ADVERSARIAL_TASKS:
            raise ValueError(f"--ema is not supported for the {self.task} task")
        if self.critic_steps < 1:
            raise ValueError(f"--critic-steps must be >= 1, got {self.critic_steps}")
        if self.task == "flow_enhancer" and not self.munet:
            raise ValueError("the flow_enhancer task needs the MUNet it enhances: --munet RUN_OR_MODEL_DIR")

    @property
    def t_max(self) -> int:
        """The largest timestep the task trains on: T for ``unet_full``, else Ttrunc."""
        return T_DIFFUSION if self.task == "unet_full" else self.t_trunc


def training_subjects(cfg: TrainConfig) -> tuple[list, list]:
    """(train, validation) subjects: a site's folder (``cfg.data_dir``) or the phantom fold of ``cfg``."""
    if cfg.data_dir:
        return split_subjects(read_training_folder(cfg.data_dir), cfg.val_subjects)
    subjects = generate_dataset(cfg.n_subjects, seed=cfg.data_seed, styles=cfg.styles)
    train_ids, val_ids, _ = fold_split(cfg.n_subjects, fold=cfg.fold)
    by_id = {subj.subject_id: subj for subj in subjects}
    return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of iteration ``step``: exponential decay from ``cfg.lr`` to ``cfg.lr_final``."""
    frac = min(step / max(cfg.iterations, 1), 1.0)
    return cfg.lr * math.exp(frac * math.log(cfg.lr_final / cfg.lr))


def save_best(model: torch.nn.Module, mcfg: Any, run_dir: Path) -> None:
    """Write ``model`` (config ``mcfg``) as ``run_dir/best.safetensors`` + ``best.json``, replacing each file
    whole (``models.io.save_model`` writes through ``atomic.atomic_file``)."""
    save_model(model, mcfg, run_dir / "best")


#: TrainConfig field -> the `ftddm-trt train` option that sets it (for messages).
_OPTION_OF = {
    "t_trunc": "--ttrunc",
    "n_subjects": "--subjects",
    "data_seed": "--data-seed",
    "batch_size": "--batch-size",
    "lr": "--learning-rate",
    "lr_final": "--learning-rate-final",
    "lr_protocol_fraction": "--lr-mask-fraction",
    "styles": "--style",
    "data_dir": "--data",
    "val_every": "--val-every",
}


def config_changes(saved: TrainConfig, requested: TrainConfig) -> list[str]:
    """Options of ``requested`` that differ from the run's ``saved`` config ("--ttrunc 100 -> 50"), except
    ``iterations`` (a resumed run may go further). Entries of ``extra`` (e.g. ``shards``) compare one by
    one, and one the request leaves out keeps the run's value (a resume without --shards keeps its shards)."""
    a, b = asdict(saved), asdict(requested)
    extra_a, extra_b = a.pop("extra", {}), b.pop("extra", {})
    a.update({f"extra.{k}": v for k, v in extra_a.items()})
    b.update({f"extra.{k}": extra_b.get(k, v) for k, v in extra_a.items()})
    b.update({f"extra.{k}": v for k, v in extra_b.items()})
    return [f"{_OPTION_OF.get(k, '--' + k.removeprefix('extra.').replace('_', '-'))} {a.get(k)!r} -> {b[k]!r}"
            for k in [*a, *(k for k in b if k not in a)] if k != "iterations" and a.get(k) != b.get(k)]


def resumed_config(state: dict, cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """The config a run resumes with: the saved one (``state["config"]``) with the requested ``iterations``.
    ValueError when the request names another task / preset or changes any other option. A flow enhancer's
    ``--munet`` may be spelled as another path (a moved or relative folder): the MUNet's recorded sha256
    decides whether it is the same network, and the run resumes with the path given."""
    saved_fields = {"margin_weight": 1.0, **state["config"]}  # saved before the option: the paper's loss
    if saved_fields.get("munet") and cfg.munet:
        saved_fields["munet"] = cfg.munet
    saved = TrainConfig(**saved_fields)
    if (saved.task, saved.preset) != (cfg.task, cfg.preset):
        raise ValueError(f"{run_dir} holds a {saved.task}/{saved.preset} run, not {cfg.task}/{cfg.preset}")
    changed = config_changes(saved, cfg)
    if changed:
        raise ValueError(f"{run_dir} was started with other options ({'; '.join(changed)}): resume with the "
                         "same options, or train into a new run folder")
    return TrainConfig(**{**saved_fields, "iterations": cfg.iterations})
