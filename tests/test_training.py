"""Training: tiny runs of the three tasks, exact resume, checkpoint swaps, no pickles, packaging."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftddm_trt.cli.main import app
from ftddm_trt.models.io import load_meta, load_model
from ftddm_trt.models.model_set import ModelSet
from ftddm_trt.training import checkpoint as ckpt_mod
from ftddm_trt.training import run_config, trainer
from ftddm_trt.training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from ftddm_trt.training.package import package_model
from ftddm_trt.training.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".npy", ".npz"}
_real_generate = run_config.generate_dataset


@functools.lru_cache(maxsize=None)
def _cached_dataset(n_subjects: int, seed: int, styles):
    return _real_generate(n_subjects, seed=seed, styles=styles)


def _generate(n_subjects: int = 25, seed: int = 0, styles=("classic",)):
    """generate_dataset is deterministic; build the 5 phantoms once for the whole module."""
    return _cached_dataset(n_subjects, seed, tuple(styles) if not isinstance(styles, str) else styles)


@pytest.fixture(autouse=True)
def _fast_dataset(monkeypatch):
    monkeypatch.setattr(run_config, "generate_dataset", _generate)


def tiny_cfg(task: str, iterations: int, **kw) -> TrainConfig:
    base = dict(task=task, preset="tiny", iterations=iterations, batch_size=2, n_subjects=5, val_every=3,
                val_examples=4, ckpt_every=3, lr=1e-3, lr_final=1e-4)
    return TrainConfig(**{**base, **kw})


def run(cfg: TrainConfig, run_dir: Path) -> dict:
    return train(cfg, run_dir, device="cpu", progress=False)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k].double() - b[k].double()).abs().max():.3g}"


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """One finished 2-iteration run per task (validated at the end, so best.* exists)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_config, "generate_dataset", _generate)
        for task in trainer.TASKS:  # munet comes before flow_enhancer, which enhances it
            extra = {"munet": str(root / "munet")} if task == "flow_enhancer" else {}
            summary = run(tiny_cfg(task, 2, val_every=2, **extra), root / task)
            out[task] = (root / task, summary)
    return out


@pytest.mark.parametrize("task", trainer.TASKS)
def test_tiny_run_writes_best_last_log_and_no_pickles(tiny_runs, task):
    run_dir, summary = tiny_runs[task]
    assert summary["step"] == 2 and summary["task"] == task
    assert summary["best_val"] == pytest.approx(summary["val"]) and torch.isfinite(torch.tensor(summary["val"]))

    # best.* is a loadable network of the right kind, at the data's 64 px
    net = load_model(run_dir / "best")
    kind = {"flow": "flow", "tdpm": "tdpm", "munet": "munet", "flow_enhancer": "flow_enhancer"}.get(task, "unet")
    assert load_meta(run_dir / "best")["kind"] == kind
    if task == "tdpm":  # the generator draws (B,1,64,64) from (B,4,64,64)
        assert net.reverse(torch.zeros(2, 1, 64, 64), torch.zeros(2, 4, 64, 64), torch.ones(2)).shape == (2, 1, 64, 64)
    else:
        assert net.config.image_size == 64
    # last/ is a complete checkpoint at step 2 holding the task's config
    last = run_dir / "last"
    assert find_checkpoint(last) == last
    state = json.loads((last / "state.json").read_text())
    assert state["step"] == 2 and state["config"]["task"] == task and state["config"]["preset"] == "tiny"
    model, opt, _ = load_checkpoint(last, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))
    assert opt.state_dict()["state"], "the Adam moments were not saved"
    assert_same_tensors(load_file(str(last / "model.safetensors")), load_file(str(run_dir / "best.safetensors")))
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and log[-1]["val"] == pytest.approx(summary["val"])

    # nothing but safetensors / JSON / the log, no leftovers of the atomic writes
    names = {p.relative_to(run_dir).as_posix() for p in files_under(run_dir)}
    # the GANs' discriminator / critic has its own checkpoint
    ckpts = {"tdpm": ("last", "last_disc"), "munet": ("last", "last_critic")}.get(task, ("last",))
    assert names == {"best.safetensors", "best.json", "log.jsonl"} | {
        f"{c}/{f}"
        for c in ckpts
        for f in ("model.safetensors", "model.json", "optim.safetensors", "optim.json", "state.json")
    }
    assert not [p for p in files_under(run_dir) if p.suffix in PICKLE_SUFFIXES]


@pytest.mark.parametrize("task,from_old,ema", [("unet", True, 0.0), ("flow", False, 0.0), ("unet", False, 0.5)],
                         ids=["unet-from-last.old", "flow", "unet-ema"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch, task, from_old, ema):
    straight = tmp_path / "straight"
    run(tiny_cfg(task, 6, ema=ema), straight)

    # the same run, killed right after its step-3 checkpoint
    real_save = trainer.save_checkpoint

    def save_then_die(folder, model, mcfg, opt, state, **kw):
        real_save(folder, model, mcfg, opt, state, **kw)
        if state["step"] == 3:
            raise KeyboardInterrupt

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(task, 6, ema=ema), resumed)
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    assert json.loads((resumed / "last" / "state.json").read_text())["step"] == 3
    if from_old:  # killed in the middle of the next swap: only last.old is whole
        (resumed / "last").rename(resumed / "last.old")
        assert find_checkpoint(resumed / "last") == resumed / "last.old"

    summary = run(tiny_cfg(task, 6, ema=ema), resumed)
    assert summary["step"] == 6
    names = ("model.safetensors", "optim.safetensors") + (("ema.safetensors",) if ema else ())
    assert (straight / "last" / "ema.safetensors").is_file() == bool(ema)
    for name in names:
        assert_same_tensors(load_file(str(straight / "last" / name)), load_file(str(resumed / "last" / name)))
    assert_same_tensors(load_file(str(straight / "best.safetensors")), load_file(str(resumed / "best.safetensors")))
    a, b = (json.loads((d / "last" / "state.json").read_text()) for d in (straight, resumed))
    assert a.pop("elapsed_s") > 0 and b.pop("elapsed_s") > 0  # wall-clock time spent: differs run to run
    assert a == b
    assert json.loads((straight / "last" / "optim.json").read_text()) == json.loads(
        (resumed / "last" / "optim.json").read_text()
    )
    assert not (resumed / "last.old").exists() and not (resumed / "last.tmp").exists()


def test_weight_average_follows_the_ema_recursion():
    """p_avg starts at the weights, then p_avg <- d * p_avg + (1 - d) * p after each update (closed form)."""
    net = torch.nn.Linear(3, 2)
    p0 = net.weight.detach().clone()
    ema = trainer.weight_average(net, 0.9)
    expected = p0.clone()
    for k in range(3):
        with torch.no_grad():
            net.weight.add_(float(k + 1))
        ema.update_parameters(net)
        expected = 0.9 * expected + 0.1 * net.weight.detach()
    assert torch.allclose(ema.module.weight, expected, atol=1e-6) and not torch.allclose(ema.module.weight, net.weight)
    # continued from a saved average: no copy of the current weights first
    again = trainer.weight_average(net, 0.9, state=ema.module.state_dict())
    again.update_parameters(net)
    assert torch.allclose(again.module.weight, 0.9 * expected + 0.1 * net.weight.detach(), atol=1e-6)
    assert trainer.weight_average(net, 0.0) is None


def test_ema_run_keeps_the_average_as_best_and_refuses_a_changed_decay(tmp_path):
    run_dir = tmp_path / "ema"
    summary = run(tiny_cfg("unet", 3, ema=0.5), run_dir)
    best, raw, avg = (load_file(str(p)) for p in (run_dir / "best.safetensors", run_dir / "last" / "model.safetensors",
                                                  run_dir / "last" / "ema.safetensors"))
    assert summary["step"] == 3
    assert_same_tensors(best, avg)  # validated at step 3, the last step: best.* is the average
    assert any(not torch.equal(best[k], raw[k]) for k in best)
    with pytest.raises(ValueError, match="--ema 0.5 -> 0.9"):
        run(tiny_cfg("unet", 4, ema=0.9), run_dir)
    with pytest.raises(ValueError, match="--ema must be in"):
        tiny_cfg("unet", 1, ema=1.0)


def test_old_learning_rate_spellings_still_reach_the_run(tmp_path):
    """`train RUN_DIR --lr X` (the old spellings) is `train --out RUN_DIR --learning-rate X`, with a deprecation
    line: resuming a run with another rate names the option in its new spelling."""
    run_dir = tmp_path / "run"
    run(tiny_cfg("unet", 1, val_every=100), run_dir)  # lr 1e-3
    res = CliRunner().invoke(app, ["train", str(run_dir), "--task", "unet", "--preset", "tiny", "--iterations", "1",
                                   "--lr", "0.5", "--lr-final", "1e-4"])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "--learning-rate 0.001 -> 0.5" in text and "--learning-rate-final" not in text.split("other options")[1]
    assert "deprecated: --lr is an old spelling of --learning-rate" in text and f"--out {run_dir}" in text


def test_a_run_folder_of_another_task_refuses_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    run(tiny_cfg("unet", 1, val_every=100), run_dir)
    before = {p: p.read_bytes() for p in files_under(run_dir)}
    for task, preset in (("unet_full", "tiny"), ("flow", "tiny"), ("unet", "cpu")):
        with pytest.raises(ValueError, match=rf"holds a unet/tiny run, not {task}/{preset}"):
            run(tiny_cfg(task, 2, preset=preset), run_dir)
    res = CliRunner().invoke(app, ["train", "--out", str(run_dir), "--task", "flow", "--preset", "tiny",
                                   "--iterations", "2"])
    assert res.exit_code == 2
    assert "holds a unet/tiny run, not flow/tiny" in " ".join(res.output.split())
    after = {p: p.read_bytes() for p in files_under(run_dir)}
    assert after.keys() - before.keys() <= {run_dir / "log.jsonl"} and all(before[p] == after[p] for p in before)


def _tiny_checkpoint_parts():
    torch.manual_seed(0)
    model, mcfg = trainer.build_model(tiny_cfg("unet", 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(
        torch.randn(1, 1, 64, 64), torch.randn(1, 4, 64, 64), torch.ones(1), torch.full((1,), 4.0)
    ).square().mean().backward()
    opt.step()
    return model, mcfg, opt


def test_checkpoint_swap_interrupted_while_only_last_old_exists_keeps_a_whole_checkpoint(tmp_path, monkeypatch):
    model, mcfg, opt = _tiny_checkpoint_parts()
    folder = tmp_path / "last"
    save_checkpoint(folder, model, mcfg, opt, {"step": 7})
    folder.rename(tmp_path / "last.old")  # state after an earlier swap died between its two renames

    real_rename = Path.rename

    def rename(self, target):
        if self.name == "last.tmp":
            raise KeyboardInterrupt  # killed just before the new checkpoint moves into place
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder, model, mcfg, opt, {"step": 8})
    monkeypatch.setattr(Path, "rename", real_rename)

    found = find_checkpoint(folder)
    assert found == tmp_path / "last.old"
    _, _, state = load_checkpoint(found, lambda m: torch.optim.Adam(m.parameters()))
    assert state == {"step": 7}

    # the next save completes the swap and cleans up
    save_checkpoint(folder, model, mcfg, opt, {"step": 9})
    assert find_checkpoint(folder) == folder
    assert not (tmp_path / "last.old").exists() and not (tmp_path / "last.tmp").exists()
    loaded, opt2, state = load_checkpoint(folder, lambda m: torch.optim.Adam(m.parameters()))
    assert state == {"step": 9}
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    for idx, st in sd1["state"].items():
        assert_same_tensors(st, sd2["state"][idx])
    assert [g["lr"] for g in sd1["param_groups"]] == [g["lr"] for g in sd2["param_groups"]]


def test_checkpoint_rejects_an_incomplete_folder(tmp_path):
    model, mcfg, opt = _tiny_checkpoint_parts()
    save_checkpoint(tmp_path / "last", model, mcfg, opt, {"step": 1})
    (tmp_path / "last" / "optim.json").unlink()
    assert find_checkpoint(tmp_path / "last") is None
    assert ckpt_mod.find_checkpoint(tmp_path / "nothing") is None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_package_model_writes_the_model_set_layout_with_matching_sha256(tiny_runs, tmp_path):
    runs = {task: tiny_runs[task][0] for task in trainer.TASKS}
    out = tmp_path / "model"
    manifest = package_model(runs, out, commands=["ftddm-trt train ..."])

    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.{e}" for n in ("unet", "unet_full", "flow", "tdpm", "regression", "munet", "flow_enhancer")
         for e in ("safetensors", "json")]
        + ["manifest.json", ".ftddm-trt.json"]
    )
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["weights"] == "best" and manifest["commands"] == ["ftddm-trt train ..."]
    for name in trainer.TASKS:
        info = manifest["networks"][name]
        digest = _sha256(out / f"{name}.safetensors")
        assert info["sha256"] == digest == json.loads((out / f"{name}.json").read_text())["sha256"]
        assert digest == _sha256(runs[name] / "best.safetensors")
        assert info["step"] == 2 and info["train_config"]["task"] == name
    models = ModelSet.open(out)
    # tdpm.* is served only when asked for (start="tdpm")
    assert models.networks == ("unet", "unet_full", "flow", "munet", "flow_enhancer")
    assert type(ModelSet.open(out, start="tdpm").load_torch()["flow"]).__name__ == "TDPMGenerator"
    assert models.hashes() == {n: manifest["networks"][n]["sha256"] for n in models.networks}
    nets = models.load_torch()
    assert type(nets["flow"]).__name__ == "ConditionalFlow"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask, "the model folder kept mkdtemp's 0700"
    assert not [p for p in files_under(out) if p.suffix in PICKLE_SUFFIXES]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"

    # refuses a non-empty folder without force; with force, `last` weights replace it
    with pytest.raises(OSError, match="not empty"):  # atomic.OutputError
        package_model(runs, out)
    manifest2 = package_model({"unet": runs["unet"]}, out, which="last", force=True)
    assert sorted(p.name for p in out.iterdir()) == [
        ".ftddm-trt.json",
        "manifest.json",
        "unet.json",
        "unet.safetensors",
    ]
    assert manifest2["networks"]["unet"]["sha256"] == _sha256(runs["unet"] / "last" / "model.safetensors")

    # a run that never validated has no best weights: a clear error, nothing written
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="best.safetensors"):
        package_model({"flow": empty}, tmp_path / "model2")
    assert not (tmp_path / "model2").exists()


def test_package_model_cli(tiny_runs, tmp_path):
    out = tmp_path / "m"
    res = CliRunner().invoke(app, ["package-model", "--out", str(out), "--flow", str(tiny_runs["flow"][0]),
                                   "--command", "ftddm-trt train runs/flow --task flow"])
    assert res.exit_code == 0, res.output
    assert ModelSet.open(out).networks == ("flow",)
    assert json.loads((out / "manifest.json").read_text())["commands"] == ["ftddm-trt train runs/flow --task flow"]
    res = CliRunner().invoke(app, ["package-model", "--out", str(out), "--flow", str(tiny_runs["flow"][0])])
    assert res.exit_code == 2 and "not empty" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["package-model", "--out", str(tmp_path / "n")])
    assert res.exit_code == 2 and "at least one of" in res.output
    res = CliRunner().invoke(app, ["package-model", "--out", str(tmp_path / "n"), "--flow", str(tiny_runs["flow"][0]),
                                   "--which", "bset"])
    assert res.exit_code == 2 and "which must be 'best' or 'last'" in " ".join(res.output.split())
    assert not (tmp_path / "n").exists()


def test_patience_stops_when_validation_stops_improving(tmp_path, monkeypatch):
    """Validation losses 1.0, 0.9, 0.95, 0.97, ...: the best is at step 2, patience 2 stops at step 4."""
    losses = iter([1.0, 0.9, 0.95, 0.97, 0.99, 1.0, 1.0, 1.0, 1.0, 1.0] * 2)
    monkeypatch.setattr(trainer, "validate", lambda *a, **k: next(losses))
    cfg = tiny_cfg("unet", 10, val_every=1, ckpt_every=100)
    summary = train(cfg, tmp_path / "run", device="cpu", progress=False, patience=2)
    assert summary["stopped_early"] and summary["step"] == 4 and summary["stale_validations"] == 2
    assert summary["best_val"] == pytest.approx(0.9)
    state = json.loads((tmp_path / "run" / "last" / "state.json").read_text())
    assert state["step"] == 4 and state["stale_validations"] == 2
    # without patience the same run goes to the end
    assert train(cfg, tmp_path / "run2", device="cpu", progress=False)["step"] == 10


def test_cumulative_steps_follow_init_from_and_base_history(tiny_runs, tmp_path):
    """A run started from a packaged network records that network's steps; the package states the sum, a
    second package from it sums again, and base_commands keep the whole history."""
    first = package_model({"unet": tiny_runs["unet"][0]}, tmp_path / "m1", commands=["train A"])
    assert first["networks"]["unet"]["cumulative_steps"] == first["networks"]["unet"]["step"] == 2
    cfg = tiny_cfg("unet", 3, val_every=3)
    train(cfg, tmp_path / "r2", device="cpu", progress=False, init_from=tmp_path / "m1" / "unet")
    second = package_model({"unet": tmp_path / "r2"}, tmp_path / "m2", commands=["train B"], base=tmp_path / "m1")
    assert second["networks"]["unet"]["step"] == 3
    assert second["networks"]["unet"]["train_config"]["extra"]["init_steps"] == 2
    assert second["networks"]["unet"]["cumulative_steps"] == 5
    third = package_model({"flow": tiny_runs["flow"][0]}, tmp_path / "m3", commands=["train C"], base=tmp_path / "m2")
    assert third["networks"]["unet"]["cumulative_steps"] == 5 and third["networks"]["unet"]["from_base"]
    assert third["base_commands"] == ["train A", "train B"] and third["commands"] == ["train C"]
    assert trainer.prior_steps(tmp_path / "m3" / "unet") == 5
    assert trainer.prior_steps(tmp_path / "nowhere" / "unet") == 0  # weights without a manifest: nothing known
    from ftddm_trt.evaluation.paper_table import budget_lines

    text = "\n".join(budget_lines(third))
    assert "`unet` (t in 1..100): 5 iterations (2 of them in the runs it started from) x batch" in text


def test_package_carries_the_distilled_student_and_breakpoint_only_with_the_base_unet_and_flow(tiny_runs, tmp_path):
    """Adding a baseline network to a model keeps its default sampler's files (distilled/, breakpoint.json);
    replacing its unet drops them (they belong to the old pair)."""
    base = package_model({"unet": tiny_runs["unet"][0], "flow": tiny_runs["flow"][0]}, tmp_path / "base")
    assert "carried" not in base
    (tmp_path / "base" / "distilled").mkdir()
    (tmp_path / "base" / "distilled" / "manifest.json").write_text('{"distilled": {"steps": 2}}')
    (tmp_path / "base" / "breakpoint.json").write_text('{"n": 4, "figures": []}')
    kept = package_model({"munet": tiny_runs["munet"][0]}, tmp_path / "kept", base=tmp_path / "base")
    assert kept["carried"] == ["distilled", "breakpoint.json"]
    assert (tmp_path / "kept" / "distilled" / "manifest.json").read_text() == '{"distilled": {"steps": 2}}'
    assert (tmp_path / "kept" / "breakpoint.json").is_file() and (tmp_path / "kept" / "munet.safetensors").is_file()
    replaced = package_model({"unet": tiny_runs["unet"][0]}, tmp_path / "replaced", base=tmp_path / "base")
    assert "carried" not in replaced
    assert not (tmp_path / "replaced" / "distilled").exists()
    assert not (tmp_path / "replaced" / "breakpoint.json").exists()
