"""Generate and validate a Triton model repository from an ONNX export.

- ``render``: the config.pbtxt text of each model (templates, tensors, serving options);
- ``validate``: configs parsed with Triton's schema and checked, whole repositories, their network files' sha256;
- ``build``: ``build_repository``, which places the files and writes the repository atomically.

The package also offers the public names of the three under ``serving.repository``, the path they had
when they were one module; code inside ftddm_trt imports them from the module that defines them.

Input: an export folder written by ``export.onnx_export.export_model_set`` (``unet.onnx``,
``unet_full.onnx``, ``flow.onnx``, ``manifest.json`` with each graph's inputs and outputs).
Output (``build_repository``)::

    OUT/repository.json                 flavour, options, export manifest (Triton ignores files here)
    OUT/ftddm_unet/config.pbtxt         x_t [1,64,64], y [4,64,64], t [1]*, s [1]* -> eps [1,64,64]
    OUT/ftddm_unet/1/model.{py,onnx,plan}
    OUT/ftddm_unet_full/...             same tensors (UNet trained on the whole chain)
    OUT/ftddm_flow/...                  eps [1,64,64], y [4,64,64], tau_f [1]* -> x [1,64,64]
    OUT/ftddm_sampler/config.pbtxt      y [4,64,64], s [1]*, parameter "settings" -> x0 [1,64,64], nfe [1]
    OUT/ftddm_sampler/1/model.py        the whole sampling loop over BLS requests

    * per-item scalars: the ONNX graphs take (B,); with max_batch_size > 0 Triton's dims exclude the
      batch, so they are dims [1] with ``reshape: { shape: [ ] }`` (clients send (B, 1)).

Flavours, from the same function:

- ``cpu``: every model is ``backend: "python"``; the network models run their ONNX file with ONNX
  Runtime (``serving/triton_templates/python/onnx_network.py``). For the nvidia-pytriton server, which has only
  the Python backend.
- ``gpu``: the network models are ``platform: "tensorrt_plan"`` with the engines of an engine folder
  (``ftddm-trt build-engine``) when one is given, else ``platform: "onnxruntime_onnx"`` with the
  TensorRT execution accelerator (engine cache path and min/opt/max profile shapes set); for NVIDIA's
  Triton container. The sampler stays a Python model.
- ``gpu-python``: the network models are ``backend: "python"`` on KIND_GPU running the engines of an
  engine folder (required) with TensorRT from Python (``serving/triton_templates/python/tensorrt_network.py``): a
  server with only the Python backend (nvidia-pytriton's tritonserver) can load it.

Config text comes from the templates in ``serving/triton_templates/templates`` (shipped inside the package);
every generated config is parsed with Triton's own schema (``model_config_pb2.ModelConfig``) and checked by
``validate_config`` before the repository is moved into place (atomic, like the export).
"""

from ftddm_trt.serving.repository.build import build_repository
from ftddm_trt.serving.repository.render import (
    DEFAULT_TRT_CACHE_PATH,
    FLAVORS,
    GPU_PLATFORMS,
    TRITON_REPO_SRC,
    TRT_PRECISIONS,
    ConfigError,
    RepoOptions,
    TensorIO,
    default_network_io,
    manifest_network_io,
    network_config,
    profile_shapes,
    sampler_config,
    sampler_io,
    triton_templates_dir,
)
from ftddm_trt.serving.repository.validate import (
    FILES_KEY,
    REPOSITORY_JSON,
    parse_config,
    validate_config,
    validate_repository,
    verify_repository_files,
)

#: The public names of the modules above, importable from the package too.
__all__ = [
    "DEFAULT_TRT_CACHE_PATH",
    "FILES_KEY",
    "FLAVORS",
    "GPU_PLATFORMS",
    "REPOSITORY_JSON",
    "TRITON_REPO_SRC",
    "TRT_PRECISIONS",
    "ConfigError",
    "RepoOptions",
    "TensorIO",
    "build_repository",
    "default_network_io",
    "manifest_network_io",
    "network_config",
    "parse_config",
    "profile_shapes",
    "sampler_config",
    "sampler_io",
    "triton_templates_dir",
    "validate_config",
    "validate_repository",
    "verify_repository_files",
]
