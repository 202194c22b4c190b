# The FTDDM client image: `ftddm-trt` (upscale-cohort, triton-repo, verify-repo) with the shipped model,
# for the Kubernetes Jobs that fill the model volume and run cohorts against the Triton servers.
#
#   docker build -f deploy/docker/client.Dockerfile -t ftddm-trt-client:0.2.0 .      (from the repository root)
#
# The networks run in the servers; this image needs no GPU. Its ftddm_trt and shipped model must be
# the server image's (build both from one checkout): `upscale-cohort` refuses networks made from
# other weights than its --model (default: the shipped model).
FROM python:3.11-slim

WORKDIR /opt/ftddm-trt
COPY pyproject.toml README.md ./
COPY ftddm_trt ./ftddm_trt
RUN python -m pip install --no-cache-dir . \
    && python -c "import ftddm_trt; print(ftddm_trt.__file__)"

ENV FTDDM_TRT_CACHE=/var/cache/ftddm-trt
ENTRYPOINT ["ftddm-trt"]
CMD ["--help"]
