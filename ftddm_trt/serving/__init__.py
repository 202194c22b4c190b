"""ftddm_trt.serving: Triton Inference Server model repository and launcher.

- ``repository``: generate (cpu / gpu flavour) and validate a model repository from an ONNX export
  (``render``, ``validate``, ``build``);
- ``launcher``: run ``tritonserver`` as ``TritonServer``, under the guard process of ``guard``; which
  binary (system or nvidia-pytriton's bundled one) and its environment come from ``tritonserver``;
- ``bls``: the server-side sampler's Backend over BLS requests (used inside ``ftddm_sampler``).

The client is ``ftddm_trt.engine.triton_backend.TritonBackend``. Nothing is imported here so that the
Triton Python stub importing ``ftddm_trt.serving.bls`` stays light.
"""
