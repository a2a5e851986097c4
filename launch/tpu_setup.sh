#!/usr/bin/env bash
# Installs this checkout on every worker of a TPU VM pod slice: its files (tracked, and untracked ones git does not
# ignore) replace ~/mirasol_jax on each worker, then `pip install -e '.[tpu,gcs]'` runs there.
#   launch/tpu_setup.sh my-tpu us-central2-b [--project=my-project]
# Run it again after changing the code, and on a slice created anew (after a preemption).
set -euo pipefail

usage='usage: launch/tpu_setup.sh TPU_NAME ZONE [--project=PROJECT]'
if (($# < 2 || $# > 3)) || [[ $1 == -* || $2 == -* || ${3:---project=} != --project=* ]]; then
  echo "${usage}" >&2
  exit 2
fi
tpu=$1
zone=$2
gcloud_flags=(--zone="${zone}" ${3:+"$3"})

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ! git -C "${repo}" rev-parse --git-dir >/dev/null 2>&1; then
  echo "tpu_setup.sh: ${repo} is not a git checkout (the files to copy are the ones git knows)" >&2
  exit 1
fi
staging=$(mktemp -d)
trap 'rm -rf "${staging}"' EXIT
# Files deleted from the work tree but still in git's index are left out.
git -C "${repo}" ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' path; do
    if [[ -e ${repo}/${path} ]]; then printf '%s\0' "${path}"; fi
  done |
  tar -C "${repo}" --null -T - -czf "${staging}/mirasol_jax.tar.gz"

gcloud compute tpus tpu-vm scp "${staging}/mirasol_jax.tar.gz" "${tpu}:mirasol_jax.tar.gz" "${gcloud_flags[@]}" \
  --worker=all
gcloud compute tpus tpu-vm ssh "${tpu}" "${gcloud_flags[@]}" --worker=all --command="$(
  cat <<'REMOTE'
set -e
rm -rf ~/mirasol_jax.new
mkdir ~/mirasol_jax.new
tar -xzf ~/mirasol_jax.tar.gz -C ~/mirasol_jax.new
rm -rf ~/mirasol_jax ~/mirasol_jax.tar.gz
mv ~/mirasol_jax.new ~/mirasol_jax
cd ~/mirasol_jax
python3 -m pip install -e '.[tpu,gcs]'
REMOTE
)"
