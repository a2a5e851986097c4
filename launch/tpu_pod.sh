#!/usr/bin/env bash
# The same training command on every worker of a TPU VM pod slice, over `gcloud compute tpus tpu-vm ssh --worker=all`.
#   launch/tpu_pod.sh my-tpu us-central2-b [--project=my-project] --config=configs/pretrain.py:size=3b \
#     --workdir=gs://my-bucket/runs/3b --config.data.path=/mnt/shared/data/vtp
# launch/tpu_setup.sh installs the project in ~/mirasol_jax on every worker first. The workdir may be a gs:// path
# (or a folder every worker mounts); the data must be on a file system every worker mounts at the same path. The run
# lives as long as this command: start it where it can stay (tmux, screen); started again with the same workdir, it
# resumes from the last checkpoint.
set -euo pipefail

usage='usage: launch/tpu_pod.sh TPU_NAME ZONE [--project=PROJECT] --config=CONFIG --workdir=DIR [--config.X=VALUE ...]'
if (($# < 2)) || [[ $1 == -* || $2 == -* ]]; then
  echo "tpu_pod.sh: the TPU's name and zone come first" >&2
  echo "${usage}" >&2
  exit 2
fi
tpu=$1
zone=$2
shift 2
gcloud_flags=(--zone="${zone}")
if [[ ${1:-} == --project=* ]]; then
  gcloud_flags+=("$1")
  shift
fi
has_config=0
has_workdir=0
for arg in "$@"; do
  case ${arg} in
    --config | --config=*) has_config=1 ;;
    --workdir | --workdir=*) has_workdir=1 ;;
  esac
done
if ((!has_config || !has_workdir)); then
  echo "tpu_pod.sh: --config and --workdir are required" >&2
  echo "${usage}" >&2
  exit 2
fi

# The worker's shell runs this: the arguments, quoted here, reach the trainer as they were typed.
enter='cd ~/mirasol_jax 2>/dev/null || { echo "no ~/mirasol_jax on this worker: run launch/tpu_setup.sh" >&2; exit 1; }'
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "${tpu}" "${gcloud_flags[@]}" --worker=all \
  --command="${enter}; exec python3 -m mirasol_jax.main train --distributed${args}"
