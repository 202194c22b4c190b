# The FTDDM server image: NVIDIA's Triton Inference Server container with the Python backend (part of
# the container), torch and ftddm_trt installed, so that the server-side sampling loop (ftddm_sampler)
# and `ftddm-trt build-engine` run inside it.
#
#   docker build -f deploy/docker/server.Dockerfile -t ftddm-trt-server:0.2.0 .      (from the repository root)
#
# NGC container 24.10 = Triton 2.51, TensorRT 10.5.0, CUDA 12.6, Ubuntu 22.04, Python 3.10. TensorRT
# engines are tied to this TensorRT version and to the GPU model: build them with this image
# (deploy/k8s/engine-build-job.yaml) on the GPU type the servers run on, and rebuild them when either changes.
ARG TRITON_CONTAINER=24.10
FROM nvcr.io/nvidia/tritonserver:${TRITON_CONTAINER}-py3

ARG TENSORRT_VERSION=10.5.0
WORKDIR /opt/ftddm-trt
COPY pyproject.toml README.md ./
COPY ftddm_trt ./ftddm_trt
# the TensorRT Python bindings of the container's own TensorRT version (build-engine); torch and the rest
# from pyproject.toml
RUN python3 -m pip install --no-cache-dir ".[tensorrt]" "tensorrt==${TENSORRT_VERSION}" \
    && python3 -c "import ftddm_trt, torch, tensorrt; print(ftddm_trt.__file__, torch.__version__, tensorrt.__version__)"

ENV FTDDM_TRT_CACHE=/var/cache/ftddm-trt
EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/models"]
