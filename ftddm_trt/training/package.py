"""Assemble a model folder (``models.model_set`` layout) from finished training runs."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ftddm_trt.atomic import atomic_dir
from ftddm_trt.data.breakpoint import BREAKPOINT_FILE
from ftddm_trt.models.io import model_sha256
from ftddm_trt.models.model_set import DISTILLED_DIR

RUN_FILES = {"unet": "unet", "unet_full": "unet_full", "flow": "flow", "tdpm": "tdpm", "regression": "regression",
             "fine_mask": "fine_mask", "munet": "munet", "flow_enhancer": "flow_enhancer"}


def _run_summary(run_dir: Path) -> dict:
    state = (
        json.loads((run_dir / "last" / "state.json").read_text()) if (run_dir / "last" / "state.json").is_file() else {}
    )
    log_lines = (run_dir / "log.jsonl").read_text().splitlines() if (run_dir / "log.jsonl").is_file() else []
    last_log = json.loads(log_lines[-1]) if log_lines else {}
    cfg = state.get("config") or {}
    step = state.get("step")
    init_steps = int((cfg.get("extra") or {}).get("init_steps", 0))
    return {
        "run_dir": str(run_dir),
        "step": step,
        "best_val": state.get("best_val"),
        "train_config": state.get("config"),
        "last_log": last_log,
        "stale_validations": state.get("stale_validations"),
        "cumulative_steps": None if step is None else int(step) + init_steps,
    }


def _check_enhancer_munet(networks: dict) -> None:
    """A flow enhancer needs the MUNet it was trained on beside it: ValueError naming the two hashes (or the
    missing ``munet``) otherwise. Enhancers that do not record their MUNet pass."""
    enh = networks.get("flow_enhancer")
    if enh is None:
        return
    want = ((enh.get("train_config") or {}).get("extra") or {}).get("munet_sha256")
    if "munet" not in networks:
        raise ValueError("the flow enhancer needs its MUNet in the same model folder: give --munet (the run it was "
                         "trained on) or a --model that holds munet.*")
    if want and networks["munet"]["sha256"] != want:
        raise ValueError(f"the flow enhancer was trained on the MUNet with sha256 {want}, but the folder's munet has "
                         f"sha256 {networks['munet']['sha256']}: package the MUNet it was trained on")


#: What belongs to a model's unet + flow pair beyond the weights: its distilled student and its measured
#: breakpoint. ``package_model`` carries them over from a base model whose unet and flow it keeps.
DEFAULT_SAMPLER_FILES: tuple[str, ...] = (DISTILLED_DIR, BREAKPOINT_FILE)


def carry_default_sampler_files(base: Path, out_dir: Path) -> list[str]:
    """Copy ``DEFAULT_SAMPLER_FILES`` present in ``base`` into ``out_dir``; returns the names copied."""
    carried = []
    for name in DEFAULT_SAMPLER_FILES:
        src = base / name
        if src.is_dir():
            shutil.copytree(src, out_dir / name)
        elif src.is_file():
            shutil.copyfile(src, out_dir / name)
        else:
            continue
        carried.append(name)
    return carried


def package_model(runs: dict[str, Path], out_dir: Path, which: str = "best", commands: list[str] | None = None,
                  force: bool = False, extra_flows: list[Path] = (), base: Path | None = None,
                  extra: dict | None = None, base_networks: tuple[str, ...] | None = None,
                  out_in_base: bool = False) -> dict:
    """Copy ``<run>/best.*`` (or ``last/model.*``) of each run into ``out_dir/<network>.*`` + manifest.json.

    ``extra_flows`` are flow runs for other truncation points; each becomes ``flow_t<Ttrunc>.*``.
    ``base`` is a model folder whose networks not trained here are copied as they are (their manifest
    entries marked ``"from_base": true``; ``base_networks``: only these of them); ``extra`` adds top-level
    manifest fields. ``out_in_base``: ``out_dir`` may be a subfolder of ``base`` (a model's ``distilled/``,
    which no reader of ``base`` opens as part of it).
    """
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    manifest: dict = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "weights": which, "commands": commands or [],
                      "networks": {}}
    files = {RUN_FILES[name]: Path(run_dir) for name, run_dir in runs.items()}
    for run_dir in extra_flows:
        cfg = _run_summary(Path(run_dir)).get("train_config") or {}
        if cfg.get("task") != "flow":
            raise ValueError(f"{run_dir} is not a flow training run")
        files[f"flow_t{cfg['t_trunc']}"] = Path(run_dir)
    inputs = (*files.values(), None if out_in_base else base)
    with atomic_dir(Path(out_dir), force=force, inputs=inputs, command="package-model") as tmp:
        for name, run_dir in files.items():
            run_dir = Path(run_dir)
            src = run_dir / "best" if which == "best" else run_dir / "last" / "model"
            if not src.with_suffix(".safetensors").is_file():
                raise FileNotFoundError(
                    f"{src.with_suffix('.safetensors')} does not exist (has {run_dir} validated yet?)"
                )
            for ext in (".safetensors", ".json"):
                shutil.copyfile(src.with_suffix(ext), (tmp / name).with_suffix(ext))
            manifest["networks"][name] = {"sha256": model_sha256(tmp / name), **_run_summary(run_dir)}
        if base is not None:
            base_manifest = (
                json.loads((Path(base) / "manifest.json").read_text())
                if (Path(base) / "manifest.json").is_file()
                else {}
            )
            base_nets = base_manifest.get("networks", {})
            # how the copied networks were made: the base's own history, then its commands
            manifest["base_commands"] = [*base_manifest.get("base_commands", []), *base_manifest.get("commands", [])]
            for src in sorted(Path(base).glob("*.safetensors")):
                name = src.stem
                if name in files or (base_networks is not None and name not in base_networks):
                    continue
                for ext in (".safetensors", ".json"):
                    shutil.copyfile(src.with_suffix(ext), (tmp / name).with_suffix(ext))
                manifest["networks"][name] = {
                    **base_nets.get(name, {}),
                    "sha256": model_sha256(tmp / name),
                    "from_base": True,
                }
            if not out_in_base and not {"unet", "flow"} & set(files):
                manifest["carried"] = carry_default_sampler_files(Path(base), tmp)
        _check_enhancer_munet(manifest["networks"])
        manifest.update(extra or {})
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
