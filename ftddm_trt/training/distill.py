"""Distil a model's default sampler into a student UNet that needs 1 to 3 evaluations (``ftddm-distilled``).

The teacher is the model's default sampler with a deterministic start: the flow's mode (``tau_f = 0``) draws
x_Ttrunc, then DPM-Solver++(2M) runs ``teacher_steps`` steps to x0 (no data consistency: corrections apply
after any sampler, the same for both). Its output is a deterministic function of the condition, so the
student learns a plain regression onto it (Salimans & Ho 2022 distil in stages; with a deterministic
teacher a single stage suffices): from the same x_Ttrunc, the deterministic DDIM chain of
``diffusion.samplers.distilled`` with the student as its UNet, unrolled for ``steps`` evaluations, must land
on the teacher's output inside M (``eps_loss`` over M).

1. A bank of teacher outputs is drawn once (``bank.safetensors`` in the work folder) from random training
   maps (augmented, every s, both mask protocols), and a validation bank from the validation subjects.
2. The student starts from the teacher's UNet and trains on the bank for a time budget, resumable
   (``last/`` checkpoint; ``best.*`` the lowest validation loss).
3. ``package_distilled`` writes a model folder: ``unet`` = the student, the teacher's flow and fine-mask
   estimator copied, and a ``distilled`` manifest record (teacher hashes, steps, budget, validation PSNR
   of the student against the teacher).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ftddm_trt.atomic import atomic_file
from ftddm_trt.constants import T_DIFFUSION, T_TRUNC
from ftddm_trt.data.examples import Batch, SlicePool, random_batch
from ftddm_trt.diffusion import CosineSchedule, distilled_sample, distilled_timesteps, eps_loss
from ftddm_trt.engine.pipeline import SamplerSpec, sample_batch
from ftddm_trt.engine.torch_backend import TorchBackend
from ftddm_trt.models.io import load_model
from ftddm_trt.models.model_set import DISTILLED_DIR, DISTILLED_KEY, FINE_MASK_FILE, ModelSet
from ftddm_trt.training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from ftddm_trt.training.package import package_model
from ftddm_trt.training.run_config import TrainConfig, save_best, training_subjects

try:
    from safetensors.torch import load_file, save_file
except ImportError:  # pragma: no cover - safetensors is a dependency
    load_file = save_file = None

BANK_FILE = "bank.safetensors"
VAL_BANK_FILE = "val_bank.safetensors"
BANK_KEYS = ("y", "s", "x_start", "target")


@dataclass
class DistillConfig:
    """Everything that defines a distillation run (saved in its checkpoint)."""

    #: UNet evaluations of the student (the ``ftddm-distilled`` sampler's ``--steps``), 1 to 3.
    steps: int = 1
    #: Training time budget in minutes, over every rerun of the same work folder (the bank not counted).
    minutes: float = 20.0
    #: Teacher outputs to train on, and to validate on (from the validation subjects).
    bank_maps: int = 1536
    val_maps: int = 128
    batch_size: int = 8
    lr: float = 5e-5
    seed: int = 0
    #: The data the bank is drawn from: phantoms (n_subjects, data_seed, styles) or a site's folder.
    n_subjects: int = 45
    data_seed: int = 0
    styles: tuple[str, ...] = ("classic", "smooth", "patchy")
    data_dir: str | None = None
    val_subjects: int = 2
    lr_protocol_fraction: float = 0.5
    #: The teacher: DPM-Solver++ steps from the flow's mode (the default sampler).
    teacher_steps: int = 20
    ttrunc: int = T_TRUNC
    val_every: int = 200
    ckpt_every: int = 100
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.styles = tuple(self.styles)
        SamplerSpec("ftddm-distilled", ttrunc=self.ttrunc, steps=self.steps)  # names a bad step count
        if self.bank_maps < self.batch_size or self.val_maps < 1:
            raise ValueError(f"the bank needs at least one batch ({self.batch_size} maps), got {self.bank_maps}")
        if not self.minutes > 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")

    def teacher_spec(self) -> SamplerSpec:
        """The sampler the student imitates: the default sampler with the flow's mode, no data consistency."""
        return SamplerSpec("ftddm-dpmpp", ttrunc=self.ttrunc, steps=self.teacher_steps, tau_f=0.0,
                           data_consistency=False)

    def student_spec(self) -> SamplerSpec:
        """The sampler the student runs in (the same settings ``upscale --sampler ftddm-distilled`` uses)."""
        return SamplerSpec("ftddm-distilled", ttrunc=self.ttrunc, steps=self.steps, tau_f=0.0, data_consistency=False)


def _subjects(cfg: DistillConfig) -> tuple[list, list]:
    return training_subjects(TrainConfig(n_subjects=cfg.n_subjects, data_seed=cfg.data_seed, styles=cfg.styles,
                                         data_dir=cfg.data_dir, val_subjects=cfg.val_subjects))


@torch.no_grad()
def teacher_bank(teacher: TorchBackend, cfg: DistillConfig, pool: SlicePool, n_maps: int, seed: int,
                 progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """``n_maps`` random maps of ``pool`` with the teacher's output: {y (N,4,64,64), s (N,), x_start (N,1,64,64)
    the flow's mode at Ttrunc, target (N,1,64,64) the teacher's x0 (normalized units, zero outside M)}."""
    rng = np.random.default_rng([seed, 7])
    spec, schedule = cfg.teacher_spec(), CosineSchedule(T_DIFFUSION)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in BANK_KEYS}
    done, chunk = 0, 32
    while done < n_maps:
        b: Batch = random_batch(pool, min(chunk, n_maps - done), rng, cfg.lr_protocol_fraction)
        mask = b.y[:, 1:2]
        x_start = teacher.flow_reverse(torch.zeros_like(b.x0), b.y, torch.zeros(len(b.s))) * mask
        out = sample_batch(teacher, spec, b.y, b.s, torch.Generator().manual_seed(seed + done), schedule)
        for k, v in (("y", b.y), ("s", b.s), ("x_start", x_start), ("target", out.x0)):
            parts[k].append(v.float().cpu())
        done += len(b.s)
        if progress is not None:
            progress(done)
    return {k: torch.cat(v).contiguous() for k, v in parts.items()}


def load_or_make_bank(path: Path, make: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The bank saved at ``path``, else ``make()`` saved there atomically (a rerun reuses it); always read back
    from the file, so a first run and a resumed one train on the same tensors."""
    if not path.is_file():
        bank = make()
        with atomic_file(path) as tmp:
            save_file(bank, str(tmp))
    return load_file(str(path))


def student_x0(student: torch.nn.Module, cfg: DistillConfig, y: torch.Tensor, s: torch.Tensor,
               x_start: torch.Tensor, schedule: CosineSchedule, clip: tuple[float, float] | None = None
               ) -> torch.Tensor:
    """The student's output from ``x_start`` through the distilled sampler's chain (differentiable)."""

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return student(x_t, y, t, s)

    timesteps = distilled_timesteps(cfg.ttrunc, cfg.steps)
    return distilled_sample(eps_fn, x_start, y[:, 1:2], schedule, timesteps, clip=clip).x0


@torch.no_grad()
def validate(student: torch.nn.Module, cfg: DistillConfig, bank: dict[str, torch.Tensor],
             schedule: CosineSchedule) -> dict[str, float]:
    """Loss (MSE over M against the teacher) and PSNR of the student's clipped output against the teacher's,
    peak = the teacher's maximum per map, on the whole validation bank."""
    student.eval()
    losses, psnrs = [], []
    for start in range(0, len(bank["s"]), 32):
        sl = slice(start, start + 32)
        y, target = bank["y"][sl], bank["target"][sl]
        pred = student_x0(student, cfg, y, bank["s"][sl], bank["x_start"][sl], schedule,
                          clip=cfg.student_spec().clip_x0)
        mask = y[:, 1:2]
        losses.append(float(eps_loss(pred, target, mask)))
        for p, t, m in zip(pred, target, mask):
            mse = float(((p - t) ** 2 * m).sum() / m.sum().clamp(min=1))
            peak = float(t.max())
            psnrs.append(10 * math.log10(peak**2 / mse) if mse > 0 and peak > 0 else float("nan"))
    student.train()
    return {"loss": float(np.mean(losses)), "psnr_vs_teacher": float(np.nanmedian(psnrs))}


def distill(teacher_dir: Path | str | None, work: Path | str, cfg: DistillConfig,
            log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train (or resume) the student of ``teacher_dir`` (default: the shipped model) in ``work``.

    Returns a summary: steps, seconds, best validation loss and PSNR against the teacher."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    schedule = CosineSchedule(T_DIFFUSION)
    models = ModelSet.open(teacher_dir, cfg.ttrunc)
    train_subjects, val_subjects = _subjects(cfg)
    with TorchBackend(models) as teacher:
        def make(pool: SlicePool, n: int, seed: int, what: str) -> Callable[[], dict[str, torch.Tensor]]:
            def run() -> dict[str, torch.Tensor]:
                log(f"drawing the teacher's outputs for {n} {what} maps ({cfg.teacher_steps + 1} NFE each) ...")
                return teacher_bank(teacher, cfg, pool, n, seed)
            return run

        bank = load_or_make_bank(work / BANK_FILE, make(SlicePool.from_subjects(train_subjects), cfg.bank_maps,
                                                        cfg.seed, "training"))
        val_bank = load_or_make_bank(work / VAL_BANK_FILE, make(SlicePool.from_subjects(val_subjects), cfg.val_maps,
                                                                cfg.seed + 10**6, "validation"))

    def new_opt(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)

    ckpt = find_checkpoint(work / "last")
    if ckpt is not None:
        student, opt, state = load_checkpoint(ckpt, new_opt)
        step, best, spent = int(state["step"]), float(state["best_val"]), float(state["elapsed_s"])
        best_psnr = float(state.get("best_psnr_vs_teacher", float("nan")))
    else:
        student = load_model(models.root / "unet")
        opt = new_opt(student)
        step, best, spent, best_psnr = 0, float("inf"), 0.0, float("nan")
        first = validate(student, cfg, val_bank, schedule)
        log(f"before distillation: student vs teacher PSNR {first['psnr_vs_teacher']:.2f} dB")
    mcfg = student.config
    t0 = time.monotonic()
    budget = 60.0 * cfg.minutes

    def elapsed() -> float:
        return spent + time.monotonic() - t0

    def checkpoint() -> None:
        save_checkpoint(work / "last", student, mcfg, opt,
                        {"step": step, "best_val": best, "best_psnr_vs_teacher": best_psnr, "elapsed_s": elapsed(),
                         "config": {**asdict(cfg), "task": "distill"}})

    n_bank = len(bank["s"])
    student.train()
    with Progress(TextColumn("[bold]distill"), BarColumn(), TextColumn("step {task.fields[step]}"),
                  TextColumn("val PSNR vs teacher {task.fields[psnr]:.2f} dB"), TimeRemainingColumn(),
                  disable=not progress) as bar:
        task = bar.add_task("distill", total=budget, completed=min(elapsed(), budget), step=step, psnr=best_psnr)
        while elapsed() < budget:
            idx = torch.from_numpy(np.random.default_rng([cfg.seed, step]).integers(0, n_bank, cfg.batch_size))
            y, s = bank["y"][idx], bank["s"][idx]
            pred = student_x0(student, cfg, y, s, bank["x_start"][idx], schedule)
            loss = eps_loss(pred, bank["target"][idx], y[:, 1:2])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            step += 1
            out_of_time = elapsed() >= budget
            if step % cfg.val_every == 0 or out_of_time:
                val = validate(student, cfg, val_bank, schedule)
                if val["loss"] < best:
                    best, best_psnr = val["loss"], val["psnr_vs_teacher"]
                    save_best(student, mcfg, work)
            if step % cfg.ckpt_every == 0 or out_of_time:
                checkpoint()
            bar.update(task, completed=min(elapsed(), budget), step=step, psnr=best_psnr)
        checkpoint()
    return {"steps": step, "seconds": elapsed(), "best_val": best, "psnr_vs_teacher": best_psnr}


def package_distilled(teacher_dir: Path | str | None, work: Path | str, out: Path | str, cfg: DistillConfig,
                      commands: list[str] | None = None, force: bool = False) -> dict:
    """Write the distilled model folder ``out``: the student (``work/best.*``) as ``unet``, the teacher's flow
    (for ``cfg.ttrunc``) and fine-mask estimator, and the ``distilled`` manifest record."""
    models = ModelSet.open(teacher_dir, cfg.ttrunc)
    summary = package_run_summary(Path(work))
    record = {
        "teacher": str(teacher_dir) if teacher_dir is not None else "the shipped model",
        "teacher_sha256": models.hashes(),
        "teacher_sampler": cfg.teacher_spec().to_dict(),
        "sampler": cfg.student_spec().to_dict(),
        "steps": cfg.steps,
        **summary,
    }
    keep = (models.flow_file, FINE_MASK_FILE)
    manifest = package_model({"unet": Path(work)}, Path(out), commands=commands, force=force, base=models.root,
                             base_networks=keep, extra={DISTILLED_KEY: record},
                             out_in_base=is_distilled_slot(models.root, out))
    return manifest


def is_distilled_slot(model_root: Path | str, out: Path | str) -> bool:
    """True when ``out`` is the model's own ``distilled/`` subfolder (an output inside the model folder that
    is allowed: no reader of the model opens it as part of the model)."""
    return Path(out).resolve() == (Path(model_root) / DISTILLED_DIR).resolve()


def package_run_summary(work: Path) -> dict:
    """Steps, seconds and validation figures of a distillation work folder (its ``last/state.json``)."""
    state = json.loads((work / "last" / "state.json").read_text())
    return {"distill_steps": state["step"], "distill_seconds": round(float(state["elapsed_s"]), 1),
            "best_val": state["best_val"], "psnr_vs_teacher": state.get("best_psnr_vs_teacher")}
