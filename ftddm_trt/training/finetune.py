"""Fine-tune a model set on a site's own high-resolution subjects (``ftddm-trt finetune``).

Steps, all resumable:

1. Check the training folder (``data.training_folder``) before anything trains: unusable data is
   refused with the file and the problem named.
2. Train each requested network (``unet`` by default; ``flow`` and ``unet_full`` on request) from the base model's
   weights, on pairs made the way an acquisition makes them (``data.examples``: k-space truncation
   to N x N for every s, both mask protocols, ``lr`` weighted by ``lr_fraction``), with the last
   ``val_subjects`` subjects held out. Networks train side by side (one process and core each) when
   the machine has the cores, each for the whole budget, else one after another sharing it; the best
   validation weights are kept. Runs live in ``work_dir`` (never inside the data folder or the base
   model) and a re-run continues them within the same total budget: each run records the time spent.
   Then, when the base has a fine-mask estimator (``models.fine_mask``), it is fine-tuned on the
   site's quality masks for ``FINE_MASK_SHARE`` of the budget (the networks get the rest), and its
   threshold and qc weight are chosen anew on the held-out subjects with the fine-tuned networks.
3. Score the base and the fine-tuned model on the held-out subjects (PSNR / SSIM against zero-filled,
   ``lr`` protocol, s = 8 and 4) and write a complete model folder: every network (untrained ones
   copied from the base), and a manifest with the data's hash, the exact command and those metrics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ftddm_trt.constants import T_TRUNC
from ftddm_trt.data.fine_mask_examples import TRAINING_CONVENTIONS
from ftddm_trt.data.qc_conventions import get_convention
from ftddm_trt.data.training_folder import folder_sha256, read_training_folder, split_subjects
from ftddm_trt.models.config import FlowConfig, UNetConfig
from ftddm_trt.models.model_set import ModelSet
from ftddm_trt.training import finetune_defaults as defaults
from ftddm_trt.training.package import package_model
from ftddm_trt.training.trainer import TrainConfig, train

__all__ = ["FinetuneConfig", "finetune", "parse_networks", "NETWORK_SHARE"]

#: Relative share of the time budget per network.
NETWORK_SHARE = {"unet": 1.0, "flow": 1.0, "unet_full": 1.0}
_TASK_OF = {"unet": "unet", "flow": "flow", "unet_full": "unet_full"}


@dataclass(frozen=True)
class FinetuneConfig:
    """What ``ftddm-trt finetune`` does (all saved in the output manifest)."""

    data_dir: Path
    out_model: Path
    base_model: Path | None = None
    minutes: float = defaults.MINUTES
    networks: tuple[str, ...] = defaults.NETWORKS  # why the UNet alone: training.finetune_defaults
    lr: float = defaults.LR
    lr_fraction: float = defaults.LR_FRACTION
    fine_mask_share: float = defaults.FINE_MASK_SHARE
    margin_weight: float = defaults.MARGIN_WEIGHT
    val_subjects: int = defaults.VAL_SUBJECTS
    batch_size: int = 8
    val_every: int = 100
    seed: int = 0
    work_dir: Path | None = None
    #: How the site's N x N qc maps are written (``data.qc_conventions``), for the validation of the qc step;
    #: ``any``: averaged over every convention the fine-mask estimator trains over.
    qc_convention: str = defaults.QC_CONVENTION

    def __post_init__(self) -> None:
        unknown = [n for n in self.networks if n not in NETWORK_SHARE]
        if unknown or not self.networks:
            raise ValueError(
                f"--networks must be a non-empty subset of {', '.join(NETWORK_SHARE)}, got {','.join(self.networks)}"
            )
        if self.minutes <= 0:
            raise ValueError(f"--minutes must be > 0, got {self.minutes}")
        if not 0.0 <= self.lr_fraction <= 1.0:
            raise ValueError(f"--lr-mask-fraction must be in [0, 1], got {self.lr_fraction}")
        if not 0.0 <= self.fine_mask_share < 1.0:
            raise ValueError(f"--fine-mask-share must be in [0, 1), got {self.fine_mask_share}")
        for what, out in (("the training runs (--work)", self.runs_dir), ("the output model", self.out_model)):
            for name, folder in (("data folder", self.data_dir), ("base model (--model)", self.base_model)):
                if folder is not None and _overlap(out, folder):
                    raise ValueError(f"{what} {out} and the {name} {folder} overlap: training inputs are never "
                                     "written to; choose a folder outside it")
        if self.qc_convention != "any":
            get_convention(self.qc_convention)

    @property
    def validation_conventions(self) -> tuple[str, ...]:
        """The qc conventions the validation writes the held-out subjects' qc maps in."""
        if self.qc_convention == "any":
            return tuple(c.name for c in TRAINING_CONVENTIONS)
        return (self.qc_convention,)

    @property
    def runs_dir(self) -> Path:
        """Where the training runs live: ``work_dir``, else ``OUT.runs`` beside the output model."""
        return self.work_dir or self.out_model.with_name(self.out_model.name + ".runs")


def _overlap(a: Path, b: Path) -> bool:
    """Whether folder ``a`` is ``b``, lies inside it, or holds it (resolved paths)."""
    ra, rb = Path(a).resolve(), Path(b).resolve()
    return ra == rb or rb in ra.parents or ra in rb.parents


def parse_networks(text: str) -> tuple[str, ...]:
    """``"unet, flow"`` -> ``("unet", "flow")`` (the ``--networks`` option; checked by FinetuneConfig)."""
    return tuple(n.strip() for n in text.split(",") if n.strip())


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
             log: Callable[[str], None] = print, dist_ctx=None) -> dict:
    """Run the three steps of the module docstring; returns the written manifest (``{}`` on ranks > 0).

    ``dist_ctx`` (``training.distributed.init_from_env`` under torchrun): every process trains the
    networks one after another with DistributedDataParallel (the global batch is ``cfg.batch_size``),
    and rank 0 alone scores and writes the model folder.
    """
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

    jobs, summaries = {}, {}
    base_mask_net = models.fine_mask_net()
    mask_minutes = cfg.minutes * cfg.fine_mask_share if base_mask_net is not None else 0.0
    net_minutes = cfg.minutes - mask_minutes
    total_share = sum(NETWORK_SHARE[n] for n in cfg.networks)
    workers = max(1, min(len(cfg.networks), os.cpu_count() or 1))
    for name in cfg.networks:  # step 2
        # networks train side by side, one core each, when there are cores for it; else one after another
        share = NETWORK_SHARE[name] / (NETWORK_SHARE[name] if workers == len(cfg.networks) else total_share)
        tcfg = TrainConfig(
            task=_TASK_OF[name],
            preset=preset_of(models, name),
            iterations=1_000_000,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            lr_final=cfg.lr,
            t_trunc=ttrunc,
            seed=cfg.seed,
            lr_protocol_fraction=cfg.lr_fraction,
            margin_weight=cfg.margin_weight,
            val_every=cfg.val_every,
            data_dir=str(Path(cfg.data_dir).resolve()),
            val_subjects=cfg.val_subjects,
            extra={"data_sha256": data_hash},
        )
        jobs[name] = (tcfg, cfg.runs_dir / name, net_minutes * share, models.root / models._stem(name))
    runs = {name: job[1] for name, job in jobs.items()}
    if dist_ctx is not None and dist_ctx.enabled:  # torchrun: the processes share each network in turn
        for name, (tcfg, run_dir, _minutes, init_from) in jobs.items():
            minutes = net_minutes * NETWORK_SHARE[name] / total_share
            log(f"fine-tuning {name} for {minutes:.1f} min on {dist_ctx.world_size} processes in {run_dir}")
            summaries[name] = train(tcfg, run_dir, max_minutes=minutes, init_from=init_from, progress=progress,
                                    dist_ctx=dist_ctx)
        if not dist_ctx.is_main:
            return {}
    else:
        log(f"fine-tuning {', '.join(cfg.networks)} for {net_minutes:g} min "
            f"({'side by side' if workers > 1 else 'one after another'}) in {cfg.runs_dir}")
        summaries = _train_all(jobs, workers, progress)
    if mask_minutes > 0:
        runs["fine_mask"] = cfg.runs_dir / "fine_mask"
        summaries["fine_mask"] = finetune_fine_mask(
            base_mask_net, train_subj, runs["fine_mask"], mask_minutes, cfg.seed, log
        )

    validation = validation_quality(models.root, runs, val_subj, cfg)  # step 3
    extra = {
        "finetune": {
            "data_dir": str(Path(cfg.data_dir).resolve()),
            "data_sha256": data_hash,
            "subjects": {"train": [s.subject_id for s in train_subj], "validation": [s.subject_id for s in val_subj]},
            "base_model": {"dir": str(models.root), "hashes": models.hashes()},
            "networks": list(cfg.networks),
            "minutes": cfg.minutes,
            "lr": cfg.lr,
            "lr_fraction": cfg.lr_fraction,
            "fine_mask_share": cfg.fine_mask_share,
            "qc_convention": cfg.qc_convention,
            "margin_weight": cfg.margin_weight,
            "training": summaries,
            "validation_quality": validation,
        }
    }
    return package_model(
        runs, cfg.out_model, which="best", commands=[command], force=force, base=models.root, extra=extra
    )


def finetune_fine_mask(base_net, train_subjects: list, run_dir: Path, minutes: float, seed: int,
                       log: Callable[[str], None] = print) -> dict:
    """Fine-tune the fine-mask estimator on ``train_subjects`` for ``minutes`` (all cores), from
    ``run_dir/best`` when an earlier run left one (resume), else from ``base_net``; writes ``run_dir/best``
    (its threshold and weight are chosen later, in ``validation_quality``). Returns the run's summary."""
    import json

    import torch

    from ftddm_trt.data.examples import SlicePool
    from ftddm_trt.models.io import load_model, save_model
    from ftddm_trt.training.fine_mask import train_fine_mask

    best = run_dir / "best"
    previous = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    init = load_model(best) if best.with_suffix(".safetensors").is_file() else base_net
    spent = float(previous.get("seconds_total", previous.get("seconds", 0.0)))  # the budget spans every rerun
    left = minutes - spent / 60.0
    if left <= 0 and init is not base_net:
        log(f"the fine-mask estimator's {minutes:.1f} min budget was spent by earlier runs in {run_dir}")
        return previous
    log(f"fine-tuning the fine-mask estimator for {left:.1f} of {minutes:.1f} min in {run_dir}")
    torch.set_num_threads(os.cpu_count() or 1)
    net, summary = train_fine_mask(
        SlicePool.from_subjects(train_subjects),
        init.config,
        minutes=max(left, 0.0),
        init=init,
        lr=FINE_MASK_LR,
        seed=seed + int(previous.get("iterations", 0)),
    )
    summary["iterations"] += int(previous.get("iterations", 0))
    summary["seconds_total"] = spent + float(summary["seconds"])
    run_dir.mkdir(parents=True, exist_ok=True)
    save_model(net, net.config, best)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


#: Adam learning rate of the fine-mask estimator's fine-tune (it was trained at 2e-3).
FINE_MASK_LR: float = 5e-4


def _train_job(tcfg: TrainConfig, run_dir: Path, minutes: float, init_from: Path, threads: int) -> dict:
    """One network's training run (a worker process when networks train side by side)."""
    import torch

    torch.set_num_threads(threads)
    return train(tcfg, run_dir, max_minutes=minutes, init_from=init_from, progress=False)


def _train_all(jobs: dict[str, tuple], workers: int, progress: bool) -> dict[str, dict]:
    """Run every job (``name -> (TrainConfig, run_dir, minutes, init_from)``), ``workers`` at a time.

    One progress bar per network follows its log (step, validation loss) against its time budget.
    """
    import json
    import multiprocessing as mp
    import time
    from concurrent.futures import ProcessPoolExecutor

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    threads = max(1, (os.cpu_count() or 1) // workers)
    columns = [
        TextColumn("[bold]{task.description:9s}"),
        BarColumn(),
        TextColumn("step {task.fields[step]}  val {task.fields[val]}"),
        TimeElapsedColumn(),
    ]
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool, \
            Progress(*columns, disable=not progress) as bar:
        futures, tasks, starts = {}, {}, {}
        for name, (tcfg, run_dir, minutes, init_from) in jobs.items():
            futures[name] = pool.submit(_train_job, tcfg, run_dir, minutes, init_from, threads)
            tasks[name] = bar.add_task(name, total=minutes * 60.0, step=0, val="-")
        while not all(f.done() for f in futures.values()):
            time.sleep(1.0)
            for name, (tcfg, run_dir, minutes, _) in jobs.items():
                log_path = run_dir / "log.jsonl"
                if log_path.is_file() and name not in starts:
                    starts[name] = time.monotonic()
                last = {}
                if log_path.is_file():
                    lines = log_path.read_text().splitlines()
                    last = json.loads(lines[-1]) if lines else {}
                done = min(time.monotonic() - starts[name], minutes * 60.0) if name in starts else 0.0
                bar.update(
                    tasks[name],
                    completed=minutes * 60.0 if futures[name].done() else done,
                    step=last.get("step", 0),
                    val=f"{last['val']:.4f}" if isinstance(last.get("val"), float) else "-",
                )
        return {name: f.result() for name, f in futures.items()}


def validation_quality(base: Path, runs: dict[str, Path], val_subjects: list, cfg: FinetuneConfig,
                       n_maps: int = 32) -> dict:
    """PSNR / SSIM and gain over zero-filled of the base and the fine-tuned networks on held-out maps.

    Default sampler, ``lr`` protocol as ``upscale`` runs it on the site's acquisitions (M from the acquired maps;
    the qc step from qc maps in ``cfg.validation_conventions``, averaged), s = 8 and 4, in-process PyTorch.
    """
    import shutil
    import tempfile

    import numpy as np

    from ftddm_trt.data.examples import SlicePool
    from ftddm_trt.engine.torch_backend import TorchBackend
    from ftddm_trt.evaluation.generalization import DEFAULT_VARIANTS, score_maps
    from ftddm_trt.evaluation.volumes import MIN_VOXELS
    from ftddm_trt.models.io import save_model
    from ftddm_trt.training.fine_mask import step_summary, tune_step

    pool = SlicePool.from_subjects(val_subjects)
    ok = np.flatnonzero(pool.masks.reshape(len(pool), -1).sum(1) >= 4 * MIN_VOXELS)
    if ok.size == 0:
        return {}
    idx = np.sort(np.random.default_rng(0).choice(ok, size=min(n_maps, ok.size), replace=False))
    variant = list(DEFAULT_VARIANTS[:1])  # the default sampler, as upscale runs it
    out: dict = {"maps": int(idx.size), "protocol": "lr", "qc_conventions": list(cfg.validation_conventions)}
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
            mask_net = ModelSet(folder).fine_mask_net()
            if label == "finetuned" and mask_net is not None and "fine_mask" in runs:
                # the fine-tuned estimator's threshold and weight, chosen with the fine-tuned networks
                mask_net.config, rows = tune_step(mask_net, backend, pool, idx, batch_size=cfg.batch_size * 4)
                save_model(mask_net, mask_net.config, runs["fine_mask"] / "best")  # packaged with them
                out["fine_mask"] = {
                    "threshold": mask_net.config.threshold,
                    "weight": mask_net.config.consistency_weight,
                    "scores": step_summary(rows),
                }
            choices = sampler_choices(variant[0]) if label == "finetuned" else variant
            for n in (8, 16):
                zf, row, *others = score_maps(backend, pool, idx, choices, n, "lr", batch_size=cfg.batch_size * 4,
                                              fine_mask_net=mask_net, conventions=cfg.validation_conventions)
                out.setdefault(f"s={64 // n}", {})["zero-filled"] = {"psnr": zf["psnr"], "ssim": zf["ssim"]}
                out[f"s={64 // n}"][label] = {"psnr": row["psnr"], "ssim": row["ssim"], "psnr_gain": row["psnr_gain"]}
                if label == "finetuned":
                    out[f"s={64 // n}"]["choices"] = [
                        {
                            "passes": r["spec"]["passes"],
                            "qc_consistency": r["qc_consistency"],
                            "psnr_gain": r["psnr_gain"],
                        }
                        for r in (row, *others)
                    ]
    out["recommended"] = recommend_sampler(out)
    return out


#: Sampler settings the fine-tune scores on its validation subjects: solver passes x qc consistency weight.
PASSES_CHOICES: tuple[int, ...] = (1, 2, 3)
#: None: upscale's default step (the model's fine-mask estimator at its weight, else the qc maps' mask at
#: ``QC_CONSISTENCY_WEIGHT``).
QC_WEIGHT_CHOICES: tuple[float | None, ...] = (None, 0.0)


def sampler_variant(default, passes: int, qc_weight: float | None, label: str | None = None):
    """``default`` (an ``evaluation.generalization.Variant``) run with ``passes`` solver passes and qc weight
    ``qc_weight`` (None: upscale's default), as ``upscale --passes P --qc-consistency W`` runs it; labelled
    "passes P, qc W" unless ``label`` is given."""
    from dataclasses import replace

    weight = "default" if qc_weight is None else f"{qc_weight:g}"
    return replace(default, label=label or f"passes {passes}, qc {weight}", spec=replace(default.spec, passes=passes),
                   qc_weight=qc_weight)


def sampler_choices(default):
    """The default variant first, then every other (passes, qc weight) of the grid above."""
    grid = [(p, w) for p in PASSES_CHOICES for w in QC_WEIGHT_CHOICES]
    return [default] + [
        sampler_variant(default, p, w) for p, w in grid if (p, w) != (default.spec.passes, default.qc_weight)
    ]


def recommend_sampler(quality: dict) -> dict:
    """The (passes, qc weight) with the highest mean validation gain over s = 8 and 4 (first wins a tie)."""
    rows: dict[tuple[int, float], list[float]] = {}
    for key in ("s=8", "s=4"):
        for c in quality.get(key, {}).get("choices", []):
            rows.setdefault((c["passes"], c["qc_consistency"]), []).append(c["psnr_gain"])
    if not rows:
        return {}
    (passes, weight), gains = max(rows.items(), key=lambda kv: sum(kv[1]) / len(kv[1]))
    return {"passes": passes, "qc_consistency": weight, "psnr_gain": sum(gains) / len(gains)}
