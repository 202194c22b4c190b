"""Training inputs are inputs: the time budget spans every rerun (and is recorded), logs are strict JSON,
and `finetune` never writes inside its data folder."""

from __future__ import annotations

import functools
import json

import pytest
from typer.testing import CliRunner

from ftddm_trt.cli.main import app
from ftddm_trt.training import run_config
from ftddm_trt.training.checkpoint import find_checkpoint
from ftddm_trt.training.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("torch_single_thread")


_REAL = run_config.generate_dataset


@functools.lru_cache(maxsize=None)
def _dataset(n_subjects: int, seed: int, styles: tuple[str, ...]):
    return _REAL(n_subjects, seed=seed, styles=styles)


@pytest.fixture(autouse=True)
def _fast_dataset(monkeypatch):
    monkeypatch.setattr(
        run_config, "generate_dataset", lambda n, seed=0, styles=("classic",): _dataset(n, seed, tuple(styles))
    )


def _cfg() -> TrainConfig:
    return TrainConfig(task="unet", preset="tiny", iterations=10_000, batch_size=2, n_subjects=5, val_every=1000,
                       val_examples=4, ckpt_every=1000, lr=1e-3, lr_final=1e-4)


def _strict(line: str) -> dict:
    def refuse(token: str):
        raise ValueError(f"not JSON: {token}")

    return json.loads(line, parse_constant=refuse)


def test_the_budget_is_the_total_over_reruns_and_the_log_is_strict_json(tmp_path):
    run_dir = tmp_path / "run"
    first = train(_cfg(), run_dir, max_minutes=0.05, device="cpu", progress=False)
    assert first["step"] >= 1 and first["seconds_total"] == pytest.approx(first["seconds"])
    state = json.loads((find_checkpoint(run_dir / "last") / "state.json").read_text())
    assert 3.0 <= state["elapsed_s"] == pytest.approx(first["seconds_total"], abs=1.0)

    again = train(_cfg(), run_dir, max_minutes=0.05, device="cpu", progress=False)  # the budget is spent
    assert again["step"] == first["step"] and again["seconds"] < 1.5
    assert again["seconds_total"] == pytest.approx(first["seconds_total"], abs=1.5)

    more = train(_cfg(), run_dir, max_minutes=0.1, device="cpu", progress=False)  # what is left of 6 s, not 6 s more
    assert more["step"] > first["step"]
    assert more["seconds"] < 6.0 - again["seconds_total"] + 2.0  # + the closing validation
    assert more["seconds_total"] == pytest.approx(again["seconds_total"] + more["seconds"], abs=1.0)

    lines = (run_dir / "log.jsonl").read_text().splitlines()
    assert lines and all(isinstance(_strict(line), dict) for line in lines)


def test_a_log_line_before_any_validation_holds_null(tmp_path):
    cfg = TrainConfig(task="unet", preset="tiny", iterations=21, batch_size=2, n_subjects=5, val_every=1000,
                      val_examples=4, ckpt_every=1000, lr=1e-3, lr_final=1e-4)
    train(cfg, tmp_path / "run", device="cpu", progress=False)
    step20, step21 = ((tmp_path / "run" / "log.jsonl").read_text().splitlines())
    assert _strict(step20)["val"] is None and "NaN" not in step20  # not validated yet: null, not bare NaN
    assert isinstance(_strict(step21)["val"], float)


def test_finetune_refuses_work_inside_the_data(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    (data / "sub-000").mkdir(parents=True)
    for work in (data / "runs", data):
        res = CliRunner().invoke(app, ["finetune", "--data", str(data), "--out", str(tmp_path / "m"),
                                       "--model", str(tiny_model_dir), "--minutes", "1", "--work", str(work)])
        assert res.exit_code != 0 and "overlap" in res.output and "--work" in res.output
        assert not (data / "runs").exists() and not (tmp_path / "m").exists()
    res = CliRunner().invoke(app, ["finetune", "--data", str(data), "--out", str(tmp_path / "m"),
                                   "--model", str(tiny_model_dir), "--minutes", "1",
                                   "--work", str(tiny_model_dir / "runs")])
    assert res.exit_code != 0 and "base model" in " ".join(res.output.split())
