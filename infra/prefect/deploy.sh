#!/usr/bin/env bash
# Create the work pools (if missing) and deploy both deployments of prefect.yaml from this
# clone. Safe to re-run. The API is $PREFECT_API_URL, else the local stack's
# (`make stack-up`, port $PREFECT_SERVER_API_PORT, default 4200).
set -euo pipefail
cd "$(dirname "$0")/../.."
# prefect.yaml's pull step is `{{ $PWD }}`: make it this clone whatever the caller's shell says.
PWD="$(pwd -P)"
export PWD
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:${PREFECT_SERVER_API_PORT:-4200}/api}"

for pool in dltrain-local dltrain-ray; do
  if prefect work-pool inspect "$pool" >/dev/null 2>&1; then
    echo "work pool $pool: exists"
  else
    prefect work-pool create "$pool" --type process >/dev/null
    echo "work pool $pool: created"
  fi
done
prefect --no-prompt deploy --all
