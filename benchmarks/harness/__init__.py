"""benchmarks.harness: timing of the FTDDM runtimes, for the scripts in ``benchmarks/`` (not part of the package).

- ``hardware``: measured matmul peak (torch, numpy), FLOPs of a forward, machine facts;
- ``timing``: ``median_time`` / ``interleaved_times`` and ``TimedBackend`` (network time inside a pipeline);
- ``workloads``: model sets (shipped, random paper-size, tiny), a phantom volume's condition, backends;
- ``per_nfe``: milliseconds per network evaluation per image vs the hardware limit, pipeline overhead;
- ``latency``: per-map latency of the whole sampler across torch, ONNX Runtime and Triton (both loops).

The scripts put the repository root on ``sys.path`` and import ``benchmarks.harness``; results are written with
``ftddm_trt.evaluation.report``.
"""
