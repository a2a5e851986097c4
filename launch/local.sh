#!/usr/bin/env bash
# N processes of one run on this machine, joined by jax.distributed (how multi-host is tested without hosts).
#   launch/local.sh 2 train --config=configs/demo.py --workdir=/tmp/mirasol_2p
# Each process sees its own devices (on CPU: one, or --xla_force_host_platform_device_count in XLA_FLAGS).
set -euo pipefail
if (($# < 2)) || [[ ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh NUM_PROCESSES COMMAND [FLAGS ...]   (COMMAND: train, eval, ...)" >&2
  exit 2
fi
count=$1
shift
port=${MIRASOL_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < count; i++)); do
  python -m mirasol_jax.main "$@" --coordinator_address="localhost:${port}" --num_processes="${count}" \
    --process_id="${i}" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "${pid}" || status=$?; done
exit "${status}"
