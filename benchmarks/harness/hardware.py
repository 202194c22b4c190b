"""What the hardware can do and what a model asks of it.

- ``peak_matmul_gflops``: measured dense fp32 matmul throughput (torch and numpy), the practical compute
  ceiling against which a network's achieved GFLOP/s is read;
- ``model_flops``: FLOPs of one forward per image (torch's ``FlopCounterMode``: 2 FLOPs per
  multiply-accumulate of convolutions, matmuls and linear layers; norms, activations and softmax
  are not counted, a few percent at most for these networks);
- ``machine_facts``: CPU model, cores, load, library versions, GPU.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class PeakResult:
    """Measured matmul throughput (median over ``repeats`` timed products of two size x size matrices)."""

    torch_gflops: float
    numpy_gflops: float
    size: int
    threads: int
    repeats: int
    torch_samples_s: list[float] = field(default_factory=list)
    numpy_samples_s: list[float] = field(default_factory=list)
    torch_bf16_gflops: float | None = None

    @property
    def best_gflops(self) -> float:
        """The higher of the torch and numpy fp32 figures (the ceiling a row is compared with)."""
        return max(self.torch_gflops, self.numpy_gflops)

    def to_dict(self) -> dict[str, Any]:
        """Every field (GFLOP/s, seconds per sample) and ``best_gflops``, for the JSON record."""
        return {**asdict(self), "best_gflops": self.best_gflops}


def available_cores() -> int:
    """CPU cores this process may run on (affinity), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Temporarily set torch's intra-op thread count (None: leave it); yields the count in effect."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def _numpy_threads(n: int | None):
    """A context limiting numpy's BLAS threads (threadpoolctl when installed, else no limit)."""
    if n is None:
        return nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def _median_matmul(mm, a, b, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        mm(a, b)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b)
        samples.append(time.perf_counter() - t0)
    return samples


def peak_matmul_gflops(
    threads: int | None = None,
    size: int = 2048,
    repeats: int = 5,
    warmup: int = 2,
    bf16: bool = False,
    seed: int = 0,
) -> PeakResult:
    """fp32 GFLOP/s of ``size x size @ size x size`` (2 size^3 FLOPs), median of ``repeats``, with torch
    and with numpy, at ``threads`` threads (None: the libraries' current setting). ``bf16``: also
    torch's bfloat16 matmul (the ceiling of autocast rows)."""
    if size < 1 or repeats < 1:
        raise ValueError("size and repeats must be >= 1")
    flop = 2.0 * size**3
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    with torch_threads(threads) as used, torch.inference_mode():
        t_samples = _median_matmul(torch.mm, a, b, repeats, warmup)
        bf16_gflops = None
        if bf16:
            ab, bb = a.bfloat16(), b.bfloat16()
            bf_samples = _median_matmul(torch.mm, ab, bb, repeats, warmup)
            bf16_gflops = flop / statistics.median(bf_samples) / 1e9
    an, bn = a.numpy(), b.numpy()
    with _numpy_threads(threads):
        n_samples = _median_matmul(np.matmul, an, bn, repeats, warmup)
    return PeakResult(
        torch_gflops=flop / statistics.median(t_samples) / 1e9,
        numpy_gflops=flop / statistics.median(n_samples) / 1e9,
        size=size,
        threads=used,
        repeats=repeats,
        torch_samples_s=t_samples,
        numpy_samples_s=n_samples,
        torch_bf16_gflops=bf16_gflops,
    )


def cuda_peak_gflops(
    dtype: torch.dtype = torch.float32, size: int = 8192, repeats: int = 10, warmup: int = 3
) -> float | None:
    """Measured GEMM GFLOP/s on CUDA device 0 in ``dtype`` (fp32 without TF32), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(size, size, device="cuda", dtype=dtype)
        b = torch.randn(size, size, device="cuda", dtype=dtype)
        for _ in range(warmup):
            torch.mm(a, b)
        torch.cuda.synchronize()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            torch.cuda.synchronize()
            samples.append(time.perf_counter() - t0)
        return 2.0 * size**3 / statistics.median(samples) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32


def model_flops(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> int:
    """FLOPs of one forward of ``module`` per image: counted with ``FlopCounterMode`` (2 x MACs of
    conv/matmul/linear/attention) on ``example_inputs`` and divided by their batch (first dim of the
    first input). Inputs may be a sequence (positional) or a mapping (keyword arguments)."""
    from torch.utils.flop_counter import FlopCounterMode

    if isinstance(example_inputs, Mapping):
        args: tuple = ()
        kwargs = dict(example_inputs)
        first = next(iter(kwargs.values()))
    else:
        args, kwargs = tuple(example_inputs), {}
        first = args[0]
    batch = int(first.shape[0]) if first.ndim else 1
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*args, **kwargs)
    return int(round(counter.get_total_flops() / max(batch, 1)))


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo (else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def gpu_facts() -> dict[str, Any] | None:
    """Name and memory of CUDA device 0 as torch sees it, or None."""
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda}


def _version(dist: str) -> str | None:
    """Installed version of distribution ``dist`` (None if absent)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_facts() -> dict[str, Any]:
    """Facts recorded beside every measurement (the machine is shared: the load average matters)."""
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "available_cores": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "onnxruntime": _version("onnxruntime"),
        "tensorrt": _version("tensorrt"),
        "tritonclient": _version("tritonclient"),
        "gpu": gpu_facts(),
    }


def machine_lines(machine: dict[str, Any], load_after: Sequence[float] | None = None) -> list[str]:
    """Markdown bullet list of the machine facts."""
    gpu = machine.get("gpu")
    lines = [
        f"- CPU: {machine.get('cpu_model')} ({machine.get('available_cores')} cores available, "
        f"{machine.get('logical_cpus')} logical); threads used: "
        f"{machine.get('threads_used', machine.get('torch_threads'))}",
        f"- GPU: {gpu['name'] + ' (' + str(gpu['memory_gib']) + ' GiB)' if gpu else 'none'}",
        f"- torch {machine.get('torch')}, onnxruntime {machine.get('onnxruntime')}, numpy {machine.get('numpy')}, "
        f"tensorrt {machine.get('tensorrt') or 'absent'}, tritonclient {machine.get('tritonclient') or 'absent'}, "
        f"Python {machine.get('python')}",
        f"- {machine.get('platform')}",
        f"- load average (1/5/15 min) before: {machine.get('load_average')}"
        + (f", after: {list(load_after)}" if load_after is not None else ""),
    ]
    return lines
