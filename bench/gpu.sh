#!/usr/bin/env bash
# The GPU path, measured (bench/gpu.py says what it does). Run on a machine with JAX and CUDA;
# TensorFlow is not needed, since the service runs on JAX there:
#   bash bench/gpu.sh                      # the service's dependencies already installed
#   WHEELS=wheels bash bench/gpu.sh        # install them offline from wheels in ./wheels first
# Make such a folder where PyPI is reachable (small wheels, well under the 64 MiB such machines take):
#   pip download -d wheels flask gunicorn pillow prometheus-client orjson keras flask-swagger-ui
# One runner holds the model on the GPU; it is measured with one front-end worker, then with
# one per core (bench/gpu.py --workers, default "1,<cores>"), against the same in-process limit.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ -n "${WHEELS:-}" ]; then
  "$python" -m pip install --quiet --no-index --find-links "$WHEELS" \
    flask gunicorn pillow prometheus-client orjson keras flask-swagger-ui
fi
export KERAS_BACKEND=jax
exec "$python" bench/gpu.py "$@"
