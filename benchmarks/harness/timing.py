"""Timing helpers: medians of repeated calls, and a Backend wrapper that measures network time.

Clocks are ``time.perf_counter``. Work on a CUDA device is synchronized before a clock is read
(``sync=True``), otherwise asynchronous kernels would be timed as free.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ftddm_trt.engine.backend import Backend

#: How timings on a shared machine are to be read (the markdown of per_nfe and latency says it).
NOISE_NOTE = ("The machine is shared with other jobs (training runs, tests): timings are noisy. Each figure is "
              "the median of the stated number of repeats, taken in blocks that alternate between backends; the "
              "load average before and after the run is recorded with the machine facts.")


@dataclass(frozen=True)
class Timing:
    """Samples of one timed call, in seconds."""

    samples: list[float]

    @property
    def median(self) -> float:
        """Median sample, seconds."""
        return statistics.median(self.samples)

    @property
    def minimum(self) -> float:
        """Fastest sample, seconds."""
        return min(self.samples)

    @property
    def maximum(self) -> float:
        """Slowest sample, seconds."""
        return max(self.samples)

    @property
    def repeats(self) -> int:
        """Number of samples."""
        return len(self.samples)

    def to_dict(self, scale: float = 1e3, unit: str = "ms") -> dict[str, Any]:
        """Median, min, max and all samples, in ``unit`` (``scale`` per second)."""
        return {f"median_{unit}": self.median * scale, f"min_{unit}": self.minimum * scale,
                f"max_{unit}": self.maximum * scale, "repeats": self.repeats,
                f"samples_{unit}": [x * scale for x in self.samples]}


def cuda_sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1,
                device: torch.device | str | None = None) -> tuple[float, list[float]]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; return (median s, samples s)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    cuda_sync(device)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        cuda_sync(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples


def interleaved_times(
    fns: Mapping[str, Callable[[], Any]],
    repeats: Mapping[str, int] | int,
    rounds: int = 3,
    pause_s: float = 0.05,
    devices: Mapping[str, torch.device | str] | None = None,
    errors: dict[str, str] | None = None,
) -> dict[str, Timing]:
    """Time several functions in blocks that alternate over ``rounds`` rounds, so that drift in the
    machine's load hits all of them alike. Each function runs ``repeats[name]`` timed calls in all
    (split over the rounds); warm them up before. ``pause_s`` between blocks lets ONNX Runtime's
    spinning thread pool go idle before the next function runs. With ``errors`` (a dict), a function
    that raises is dropped with its message recorded there instead of ending the whole measurement."""
    reps = {k: (repeats if isinstance(repeats, int) else repeats[k]) for k in fns}
    devices = devices or {}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    failed: set[str] = set()
    rounds = max(1, rounds)
    for r in range(rounds):
        for k, fn in fns.items():
            n = reps[k] // rounds + (1 if r < reps[k] % rounds else 0)
            if n == 0 or k in failed:
                continue
            time.sleep(pause_s)
            for _ in range(n):
                t0 = time.perf_counter()
                try:
                    fn()
                    cuda_sync(devices.get(k))
                except Exception as err:
                    if errors is None:
                        raise
                    errors[k] = f"{type(err).__name__}: {str(err)[:300]}"
                    failed.add(k)
                    break
                samples[k].append(time.perf_counter() - t0)
    return {k: Timing(v) for k, v in samples.items() if v and k not in failed}


@dataclass
class NetworkTime:
    """Seconds spent in, and calls made to, one network method."""

    seconds: float = 0.0
    calls: int = 0
    images: int = 0


class TimedBackend(Backend):
    """Forwards to ``inner`` and accumulates the time spent in ``unet`` and ``flow_reverse``.

    Everything outside these two calls (sampler arithmetic, random draws, batching, copies back to
    the CPU) is the pipeline's overhead: ``overhead = (wall - network_seconds) / wall``. On CUDA the
    device is synchronized after each call (``sync``) so that its kernels count as network time.
    """

    def __init__(self, inner: Backend, sync: bool | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.device = inner.device
        self.sync = (inner.device.type == "cuda") if sync is None else sync
        self.times: dict[str, NetworkTime] = {}

    def reset(self) -> None:
        """Forget the network times accumulated so far."""
        self.times = {}

    def _timed(self, key: str, fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        if self.sync:
            cuda_sync(self.device)
        rec = self.times.setdefault(key, NetworkTime())
        rec.seconds += time.perf_counter() - t0
        rec.calls += 1
        rec.images += int(out.shape[0])
        return out

    def unet(self, x_t, y, t, s, full: bool = False) -> torch.Tensor:
        """``inner.unet`` (predicted noise (B,1,64,64)), its time added to ``unet`` or ``unet_full``."""
        return self._timed("unet_full" if full else "unet", self.inner.unet, x_t, y, t, s, full=full)

    def flow_reverse(self, eps, y, tau_f) -> torch.Tensor:
        """``inner.flow_reverse`` (x_Ttrunc (B,1,64,64)), its time added to ``flow``."""
        return self._timed("flow", self.inner.flow_reverse, eps, y, tau_f)

    @property
    def seconds(self) -> float:
        """Network seconds over every network since the last reset."""
        return sum(r.seconds for r in self.times.values())

    @property
    def calls(self) -> int:
        """Network calls over every network since the last reset."""
        return sum(r.calls for r in self.times.values())

    def summary(self) -> dict[str, Any]:
        """Network seconds and calls in all, and seconds, calls and images per network."""
        return {
            "network_s": self.seconds,
            "calls": self.calls,
            "per_network": {
                k: {"seconds": v.seconds, "calls": v.calls, "images": v.images} for k, v in self.times.items()
            },
        }

    def describe(self) -> dict[str, Any]:
        """The inner backend's description."""
        return self.inner.describe()

    def close(self) -> None:
        """Close the inner backend."""
        self.inner.close()
