"""Fine-tune a model set on a site's own high-resolution subjects (``ftddm-trt finetune``).

Steps, all resumable:

1. Check the training folder (``data.training_folder``) before anything trains: unusable data is
   refused with the file and the problem named.
2. Train each requested network (``unet``, ``flow``; ``unet_full`` on request) from the base model's
   weights, on pairs made the way an acquisition makes them (``data.examples``: k-space truncation
   to N x N for every s, both mask protocols, ``lr`` weighted by ``lr_fraction``), with the last
   ``val_subjects`` subjects held out. Each network gets its share of the time budget; the best
   validation weights are kept. Runs live in ``work_dir`` and a re-run continues them.
3. Score the base and the fine-tuned model on the held-out subjects (PSNR / SSIM against zero-filled,
   ``lr`` protocol, s = 8 and 4) and write a complete model folder: every network (untrained ones
   copied from the base), and a manifest with the data's hash, the exact command and those metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ftddm_trt.constants import T_TRUNC
from ftddm_trt.data.training_folder import folder_sha256, read_training_folder, split_subjects
from ftddm_trt.models.config import FlowConfig, UNetConfig
from ftddm_trt.models.model_set import ModelSet
from ftddm_trt.training.package import package_model
from ftddm_trt.training.trainer import TrainConfig, train

__all__ = ["FinetuneConfig", "finetune", "NETWORK_SHARE"]

#: Relative share of the time budget per network.
NETWORK_SHARE = {"unet": 1.0, "flow": 1.0, "unet_full": 1.0}
_TASK_OF = {"unet": "unet", "flow": "flow", "unet_full": "unet_full"}


@dataclass(frozen=True)
class FinetuneConfig:
    """What ``ftddm-trt finetune`` does (all saved in the output manifest)."""

    data_dir: Path
    out_model: Path
    base_model: Path | None = None
    minutes: float = 10.0
    networks: tuple[str, ...] = ("unet", "flow")
    lr: float = 1e-4
    lr_fraction: float = 0.75
    val_subjects: int = 2
    batch_size: int = 8
    val_every: int = 100
    seed: int = 0
    work_dir: Path | None = None

    def __post_init__(self) -> None:
        unknown = [n for n in self.networks if n not in NETWORK_SHARE]
        if unknown or not self.networks:
            raise ValueError(f"--networks must be a non-empty subset of {', '.join(NETWORK_SHARE)}, got {','.join(self.networks)}")
        if self.minutes <= 0:
            raise ValueError(f"--minutes must be > 0, got {self.minutes}")
        if not 0.0 <= self.lr_fraction <= 1.0:
            raise ValueError(f"--lr-fraction must be in [0, 1], got {self.lr_fraction}")

    @property
    def runs_dir(self) -> Path:
        return self.work_dir or self.out_model.with_name(self.out_model.name + ".runs")


def preset_of(models: ModelSet, name: str) -> str:
    """The preset a base network was built from (manifest, else by matching its config)."""
    cfg = (models.manifest().get("networks", {}).get(models._stem(name), {}).get("train_config") or {})
    if cfg.get("preset"):
        return str(cfg["preset"])
    kind = FlowConfig if name == "flow" else UNetConfig
    saved = kind.from_dict(models.config(name)["config"])
    for preset in ("cpu", "paper", "tiny"):
        if kind.preset(preset).replace(image_size=saved.image_size) == saved:
            return preset
    raise ValueError(f"{models.root}: cannot tell which preset its {name} network was built from")


def finetune(cfg: FinetuneConfig, command: str, force: bool = False, progress: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Run the three steps of the module docstring; returns the written manifest."""
    subjects = read_training_folder(cfg.data_dir)  # step 1: refuse bad data before anything trains
    train_subj, val_subj = split_subjects(subjects, cfg.val_subjects)
    models = ModelSet.open(cfg.base_model)
    missing = [n for n in cfg.networks if n not in models.networks]
    if missing:
        raise FileNotFoundError(f"base model {models.root} has no {', '.join(missing)} network to fine-tune")
    ttrunc = models.flow_ttrunc() or T_TRUNC
    data_hash = folder_sha256(cfg.data_dir)
    log(f"{len(subjects)} subjects ({len(train_subj)} train, {len(val_subj)} validation: "
        f"{', '.join(s.subject_id for s in val_subj)}), data sha256 {data_hash[:12]}")

    runs: dict[str, Path] = {}
    summaries = {}
    total_share = sum(NETWORK_SHARE[n] for n in cfg.networks)
    for name in cfg.networks:  # step 2
        minutes = cfg.minutes * NETWORK_SHARE[name] / total_share
        tcfg = TrainConfig(task=_TASK_OF[name], preset=preset_of(models, name), iterations=1_000_000,
                           batch_size=cfg.batch_size, lr=cfg.lr, lr_final=cfg.lr, t_trunc=ttrunc, seed=cfg.seed,
                           lr_protocol_fraction=cfg.lr_fraction, val_every=cfg.val_every,
                           data_dir=str(Path(cfg.data_dir).resolve()), val_subjects=cfg.val_subjects,
                           extra={"data_sha256": data_hash})
        run_dir = cfg.runs_dir / name
        log(f"fine-tuning {name} for {minutes:.1f} min in {run_dir}")
        summaries[name] = train(tcfg, run_dir, max_minutes=minutes, init_from=models.root / models._stem(name),
                                progress=progress)
        runs[name] = run_dir

    validation = validation_quality(models.root, runs, val_subj, cfg)  # step 3
    extra = {"finetune": {"data_dir": str(Path(cfg.data_dir).resolve()), "data_sha256": data_hash,
                          "subjects": {"train": [s.subject_id for s in train_subj], "validation": [s.subject_id for s in val_subj]},
                          "base_model": {"dir": str(models.root), "hashes": models.hashes()},
                          "networks": list(cfg.networks), "minutes": cfg.minutes, "lr": cfg.lr,
                          "lr_fraction": cfg.lr_fraction, "training": summaries, "validation_quality": validation}}
    return package_model(runs, cfg.out_model, which="best", commands=[command], force=force, base=models.root, extra=extra)


def validation_quality(base: Path, runs: dict[str, Path], val_subjects: list, cfg: FinetuneConfig,
                       n_maps: int = 32) -> dict:
    """PSNR / SSIM and gain over zero-filled of the base and the fine-tuned networks on held-out maps.

    Default sampler, ``lr`` protocol, s = 8 and 4, in-process PyTorch (no export needed).
    """
    import shutil
    import tempfile

    import numpy as np

    from ftddm_trt.bench.generalization import Variant, score_maps
    from ftddm_trt.data.evaluation import MIN_VOXELS
    from ftddm_trt.data.examples import SlicePool
    from ftddm_trt.engine.pipeline import SamplerSpec
    from ftddm_trt.engine.torch_backend import TorchBackend

    pool = SlicePool.from_subjects(val_subjects)
    ok = np.flatnonzero(pool.masks.reshape(len(pool), -1).sum(1) >= 4 * MIN_VOXELS)
    if ok.size == 0:
        return {}
    idx = np.sort(np.random.default_rng(0).choice(ok, size=min(n_maps, ok.size), replace=False))
    variant = [Variant("default sampler", SamplerSpec())]
    out: dict = {"maps": int(idx.size), "protocol": "lr"}
    with tempfile.TemporaryDirectory() as tmp:
        tuned = Path(tmp) / "model"
        tuned.mkdir()
        for src in Path(base).glob("*.safetensors"):  # base networks, then the fine-tuned ones over them
            for ext in (".safetensors", ".json"):
                shutil.copyfile(src.with_suffix(ext), (tuned / src.stem).with_suffix(ext))
        for name, run_dir in runs.items():
            if (run_dir / "best.safetensors").is_file():
                for ext in (".safetensors", ".json"):
                    shutil.copyfile((run_dir / "best").with_suffix(ext), (tuned / name).with_suffix(ext))
        for label, folder in (("base", Path(base)), ("finetuned", tuned)):
            backend = TorchBackend(ModelSet(folder))
            for n in (8, 16):
                zf, row = score_maps(backend, pool, idx, variant, n, "lr", batch_size=cfg.batch_size * 4)
                out.setdefault(f"s={64 // n}", {})["zero-filled"] = {"psnr": zf["psnr"], "ssim": zf["ssim"]}
                out[f"s={64 // n}"][label] = {"psnr": row["psnr"], "ssim": row["ssim"], "psnr_gain": row["psnr_gain"]}
    return out
