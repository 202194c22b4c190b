"""Merging the requests Triton's dynamic batcher hands a Python model into one network call, and
splitting the outputs back: pure numpy, shared by the Python-backend network models that import
ftddm_trt (``ftddm_trt/serving/triton_templates/python/tensorrt_network.py``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def as_graph_rank(arr: np.ndarray, rank: int) -> np.ndarray:
    """A request tensor reshaped to the rank the graph expects: per-item scalars travel as (B, 1)
    (Triton dims [1]) and the graph takes (B,)."""
    arr = np.asarray(arr)
    if arr.ndim != rank:
        arr = arr.reshape(arr.shape[0], *([] if rank == 1 else arr.shape[1:]))
    return np.ascontiguousarray(arr, dtype=np.float32)


def merge(feeds: Sequence[Mapping[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Concatenate per-request feeds along the batch axis; returns (merged feeds, offsets (R+1,))."""
    if not feeds:
        raise ValueError("no requests to merge")
    names = list(feeds[0])
    sizes = []
    for f in feeds:
        if list(f) != names:
            raise ValueError(f"requests carry different tensors: {list(f)} vs {names}")
        b = {int(v.shape[0]) for v in f.values()}
        if len(b) != 1:
            raise ValueError(f"the tensors of one request disagree on the batch size: {sorted(b)}")
        sizes.append(b.pop())
    merged = {n: np.concatenate([f[n] for f in feeds]) if len(feeds) > 1 else feeds[0][n] for n in names}
    return merged, np.cumsum([0, *sizes])


def split(outputs: Mapping[str, np.ndarray], offsets: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Per-request slices of merged outputs (inverse of ``merge``)."""
    return [{n: np.ascontiguousarray(o[offsets[k] : offsets[k + 1]]) for n, o in outputs.items()}
            for k in range(len(offsets) - 1)]
