# Image of the CNN classifier service: `cnn-serve` (gunicorn) on port 8080, gRPC on 8081.
#
# CPU image (the default; TensorFlow from the `cpu` extra, i.e. tensorflow-cpu):
#   docker build -t cnn-serving:cpu .
# GPU image (the `gpu` extra, i.e. tensorflow[and-cuda]): CUDA and cuDNN come as pip wheels,
# so the same Python base serves both, and the host needs only the NVIDIA driver and the
# NVIDIA Container Toolkit. Not an nvidia/cuda base: it has no Python 3.11 where the venv
# expects it, and its CUDA libraries would duplicate the wheels'.
#   docker build --build-arg TF_EXTRA=gpu -t cnn-serving:gpu .
#   docker run --rm --gpus 1 -p 8080:8080 cnn-serving:gpu
# Training image (cnn-train too, for k8s/publish): the train extra beside TensorFlow's:
#   docker build --build-arg TF_EXTRA=cpu,train -t cnn-serving:cpu-train .
# A model repository (several models, new versions loaded without a restart) mounted instead:
#   docker run --rm -p 8080:8080 -v "$PWD/models:/models:ro" \
#     -e MODEL_REPOSITORY=/models -e MODEL_DIR= cnn-serving:cpu
#
# The model, two ways (MODEL_DIR=/models in the image; a model folder or numbered versions):
#   1. baked in from a folder of the build context (train first: `make run` makes models/shapes):
#        docker build --build-arg MODEL_SRC=models/shapes -t cnn-serving:cpu .
#        docker run --rm -p 8080:8080 cnn-serving:cpu
#   2. mounted at run time, read-only, over the empty /models of an image built without MODEL_SRC:
#        docker run --rm -p 8080:8080 -v "$PWD/models/shapes:/models:ro" cnn-serving:cpu
# Settings are environment variables (docs/configuration.md), e.g. -e MAX_BATCH_SIZE=64.
# It runs as well with a read-only root filesystem: --read-only --tmpfs /tmp
#
# Reproducible builds: pin the base by digest, e.g.
#   --build-arg BASE_IMAGE=python:3.11-slim-bookworm@sha256:<digest>
# Written for the classic builder as well as BuildKit: no heredocs, no COPY --link. The
# classic builder runs every stage, which is why CPU/GPU is a build argument, not a target.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- builder: a virtual environment with the service and its dependencies --------------
FROM ${BASE_IMAGE} AS builder
# The pyproject extras to install, comma-separated: cpu or gpu (TensorFlow), and train for an
# image that also runs cnn-train (its plots need matplotlib), e.g. cpu,train.
ARG TF_EXTRA=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so a code change does not reinstall TensorFlow.
COPY pyproject.toml ./
RUN python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print(*p['dependencies'], *[d for e in sys.argv[1].split(',') for d in p['optional-dependencies'][e]], sep='\n')" "${TF_EXTRA}" > requirements.txt \
    && pip install --requirement requirements.txt
COPY README.md ./
COPY service ./service
COPY training ./training
COPY model_folder ./model_folder
RUN pip install --no-deps .

# --- model: MODEL_SRC's files, or nothing ----------------------------------------------
FROM ${BASE_IMAGE} AS model
# A folder of the build context holding a model (or numbered versions); empty: mount one.
ARG MODEL_SRC=
WORKDIR /models
# COPY needs one source that always exists: pyproject.toml stands in, then goes. The
# service's user must read the model whatever umask its files were written under.
COPY pyproject.toml ${MODEL_SRC} ./
RUN rm pyproject.toml && chmod -R a+rX .

# --- runtime ---------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
# curl serves HEALTHCHECK; the fixed uid lets Kubernetes check runAsNonRoot.
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 cnn \
    && useradd --system --uid 10001 --gid cnn --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin cnn
COPY --from=builder /opt/venv /opt/venv
# Root-owned and read-only to the service: a served model never changes under it.
COPY --from=model /models /models
# HOME=/tmp: Keras keeps its config under $HOME, and /tmp is the one writable place
# (an emptyDir or tmpfs under a read-only root filesystem). Bytecode was compiled at install.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODEL_DIR=/models \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus
USER 10001:10001
EXPOSE 8080 8081
# /healthz answers while the model still loads; the start period covers TensorFlow's import.
# (Map another host port with -p rather than changing PORT, or this probes the wrong one.)
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["curl", "-fsS", "http://localhost:8080/healthz"]
# cnn-serve checks the model, then execs gunicorn, which becomes PID 1 and gets SIGTERM.
ENTRYPOINT ["cnn-serve"]
