#!/usr/bin/env bash
# The same command on every host of a TPU pod slice; jax.distributed finds the pod on its own.
#   launch/tpu_pod.sh my-tpu us-central2-b --config=configs/pretrain.py:size=3b --workdir=gs://bucket/runs/3b ...
# The repository must be installed on every host first (`pip install -e .` in the same path).
set -euo pipefail
tpu=$1; zone=$2; shift 2
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "${tpu}" --zone="${zone}" --worker=all \
  --command="cd ~/mirasol_jax && python -m mirasol_jax.main train ${args}"
