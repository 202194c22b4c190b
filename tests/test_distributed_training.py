"""Training across processes: `ftddm-trt train` under torchrun (2 CPU processes, gloo, DDP) against one process.

The global batch of 4 is 2 shards of 2. One process computes both shards (gradient accumulation),
two processes one each (DDP averages): the same examples and noise, so the weights after the same
steps agree up to float summation order. Tolerance: 1e-5 absolute on every parameter (Adam moves a
parameter by at most ~lr = 1e-4 per step; float rounding of the averaged gradient changes updates
by orders of magnitude less; measured on this 2-core CPU: 0, bit for bit). The same run with one
shard per batch (other examples) lands 7.7e-4 away, so the check can fail. Rank 0 alone writes checkpoints,
best weights and the log, and a run stopped after 2 iterations and resumed to 4 under torchrun equals the uninterrupted
one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftddm_trt.training.checkpoint import find_checkpoint
from ftddm_trt.training.distributed import DistContext, backward_step, check_shards, init_from_env, shard_generators
from ftddm_trt.training.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("torch_single_thread")
ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-5
COMMON = [
    "--task",
    "unet",
    "--preset",
    "tiny",
    "--batch-size",
    "4",
    "--subjects",
    "5",
    "--val-every",
    "2",
    "--device",
    "cpu",
    "--learning-rate",
    "1e-4",
    "--learning-rate-final",
    "1e-4",
]

SPY = """
import os, sys
from ftddm_trt.training import trainer

rank = os.environ.get("RANK", "0")

def spy(fn, what):
    def wrapped(*a, **k):
        with open(os.environ["FTDDM_WRITES"], "a") as f:
            f.write(f"{rank} {what}\\n")
        return fn(*a, **k)
    return wrapped

trainer.save_checkpoint = spy(trainer.save_checkpoint, "checkpoint")
trainer.save_best = spy(trainer.save_best, "best")
from ftddm_trt.cli.main import app
app(prog_name="ftddm-trt")
"""


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model weights of a run's last checkpoint."""
    from safetensors.torch import load_file

    ckpt = find_checkpoint(run_dir / "last")
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    return load_file(str(ckpt / "model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a and set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def torchrun(run_dir: Path, iterations: int, writes: Path, tmp: Path) -> subprocess.CompletedProcess:
    script = tmp / "spy_train.py"
    script.write_text(SPY)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "FTDDM_WRITES": str(writes),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           "train", "--out", str(run_dir), *COMMON, "--iterations", str(iterations)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def single(run_dir: Path, iterations: int, shards: int) -> dict:
    cfg = TrainConfig(task="unet", preset="tiny", iterations=iterations, batch_size=4, n_subjects=5, val_every=2,
                      lr=1e-4, lr_final=1e-4, extra={"shards": shards})
    return train(cfg, run_dir, device="cpu", progress=False)


@pytest.mark.slow
def test_two_processes_match_one_and_resume(tmp_path):
    ref = tmp_path / "one"
    single(ref, 4, shards=2)
    other = tmp_path / "one-unsharded"
    single(other, 4, shards=1)

    run = tmp_path / "two"
    writes = tmp_path / "writes.txt"
    first = torchrun(run, 2, writes, tmp_path)  # stopped after 2 iterations ...
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = torchrun(run, 4, writes, tmp_path)  # ... and resumed to 4
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    d = max_diff(weights(run), weights(ref))
    print(f"max |dw| 2 processes vs 1: {d:.3g}; unsharded vs sharded: {max_diff(weights(other), weights(ref)):.3g}")
    assert d <= ATOL, f"2 processes vs 1 process, same global batch: max |dw| = {d:.3g}"
    assert max_diff(weights(other), weights(ref)) > 10 * ATOL  # another batch draw is far away: the check can fail

    lines = writes.read_text().split()
    ranks = set(lines[0::2])
    assert ranks == {"0"}, f"only rank 0 writes, got writes from ranks {ranks}"
    assert lines.count("checkpoint") >= 2
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "one log line per logged step (rank 0 only)"
    printed = second.stdout + second.stderr  # rank 0's summary (rich prints to stderr)
    assert re.search(r'"processes":\s*2\b', printed) and re.search(r'"step":\s*4\b', printed), printed[-2000:]
    assert len(re.findall(r'"processes"', printed)) == 1, "only rank 0 prints the summary"
    state = json.loads((find_checkpoint(run / "last") / "state.json").read_text())
    assert state["step"] == 4 and state["config"]["extra"]["shards"] == 2


def test_shard_generators_and_checks():
    a = shard_generators(3, 7, 0, 1)
    assert a[0].integers(1 << 30) == __import__("numpy").random.default_rng([3, 7]).integers(1 << 30)
    assert torch.equal(
        torch.randn(3, generator=a[1]), torch.randn(3, generator=torch.Generator().manual_seed(3 * 1_000_003 + 7))
    )
    s0, s1 = shard_generators(3, 7, 0, 2), shard_generators(3, 7, 1, 2)
    assert not torch.equal(torch.randn(3, generator=s0[1]), torch.randn(3, generator=s1[1]))
    with pytest.raises(ValueError, match="multiple of the process count"):
        check_shards(3, 6, DistContext(rank=0, world_size=2))
    with pytest.raises(ValueError, match="divide"):
        check_shards(2, 5, DistContext())
    ctx = init_from_env("cpu")  # no torchrun variables: one process, nothing initialized
    assert not ctx.enabled and ctx.is_main and ctx.any_true(True) and not ctx.any_true(False)


def test_accumulated_shards_equal_the_mean_gradient():
    """One process, 2 shards: the gradient is the mean of the two shards' gradients (checked by hand)."""
    lin = torch.nn.Linear(3, 1)
    data = {
        0: torch.randn(2, 3, generator=torch.Generator().manual_seed(0)),
        1: torch.randn(2, 3, generator=torch.Generator().manual_seed(1)),
    }
    drawn = []

    def draw(rng, n):
        j = len(drawn) % 2
        drawn.append(n)
        return data[j]

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x, gen):
            return self.lin(x).pow(2).mean(), {"n": float(x.shape[0])}

    m = M()
    loss, parts = backward_step(DistContext(), m, draw, seed=0, step=0, batch_size=4, shards=2)
    got = lin.weight.grad.clone()
    want = []
    for j in (0, 1):
        lin.zero_grad()
        lin(data[j]).pow(2).mean().backward()
        want.append(lin.weight.grad.clone())
    torch.testing.assert_close(got, (want[0] + want[1]) / 2)
    assert drawn == [2, 2] and parts == {"n": 2.0}
    with torch.no_grad():
        assert float(loss) == pytest.approx(
            float((lin(data[0]).pow(2).mean() + lin(data[1]).pow(2).mean()) / 2), rel=1e-6
        )
