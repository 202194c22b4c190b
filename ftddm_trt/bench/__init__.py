"""ftddm_trt.bench: performance benchmarks of the FTDDM runtimes (used by ``benchmarks/*.py``).

- ``hardware``: measured matmul peak (torch, numpy), FLOPs of a forward, machine facts;
- ``timing``: ``median_time`` / ``interleaved_times`` and ``TimedBackend`` (network time inside a pipeline);
- ``workloads``: model sets (shipped, random paper-size, tiny), a phantom volume's condition, backends;
- ``per_nfe``: milliseconds per network evaluation per image vs the hardware limit, pipeline overhead;
- ``latency``: per-map latency of the whole sampler across torch, ONNX Runtime and Triton (both loops);
- ``report``: JSON and markdown helpers;
- ``quality``: quality versus NFE on the phantom test split (written by another worker).

Nothing in the runtime imports this package.
"""
