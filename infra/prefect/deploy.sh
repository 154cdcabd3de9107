#!/usr/bin/env bash
# Deploy prefect.yaml's deployments from this clone, creating their work pools if missing.
# Safe to re-run.
#
#   deploy.sh [local]   the on-demand `local` deployment (pool dltrain-local): `make deploy`
#   deploy.sh cluster   the weekly `scheduled-retraining` (pool dltrain-ray): `make deploy-cluster`
#   deploy.sh tuning    the on-demand sweep `tuning` of the mnist-tuning flow (pool dltrain-local)
#
# The cluster's schedule is deployed only when asked: deployed from a laptop, it would queue a
# run every week in a pool that has no worker there.
#
# The API is $PREFECT_API_URL, else the active Prefect profile's (`make stack-up` makes its
# own profile active), else the local stack's (port $PREFECT_SERVER_API_PORT, default 4200).
set -euo pipefail
cd "$(dirname "$0")/../.."
# prefect.yaml's pull step is `{{ $PWD }}`: make it this clone whatever the caller's shell says.
PWD="$(pwd -P)"
export PWD
if [ -z "${PREFECT_API_URL:-}" ]; then
  # Read whole before grep looks at it: with pipefail, `grep -q` leaving a pipe early could
  # fail the pipeline and hide the profile's URL.
  view="$(prefect config view 2>/dev/null || true)"
  if ! grep -q "^PREFECT_API_URL=" <<<"$view"; then
    export PREFECT_API_URL="http://127.0.0.1:${PREFECT_SERVER_API_PORT:-4200}/api"
  fi
fi

case "${1:-local}" in
  local) pool=dltrain-local; deployment=local ;;
  cluster) pool=dltrain-ray; deployment=scheduled-retraining ;;
  tuning) pool=dltrain-local; deployment=tuning ;;
  *) echo "usage: $0 [local|cluster|tuning]" >&2; exit 2 ;;
esac

# The API these commands use, as Prefect resolves it, with any user:password@ left out.
api_url() {
  local url="${PREFECT_API_URL:-}"
  [ -n "$url" ] || url="$(grep -m1 "^PREFECT_API_URL=" <<<"${view:-}" | cut -d= -f2- | cut -d"'" -f2)"
  sed -E 's#//[^/@]*@#//#' <<<"${url:-none set}"
}

if prefect work-pool inspect "$pool" >/dev/null 2>&1; then
  echo "work pool $pool: exists"
elif out="$(prefect work-pool create "$pool" --type process 2>&1)"; then
  echo "work pool $pool: created"
else
  # Prefect's own message, without its traceback's frames (the exception lines stay).
  msg="$(grep -v -E '^(Traceback |[[:space:]]|During handling|The above exception|$)' <<<"$out" || true)"
  echo "deploy: could not create work pool $pool at the Prefect API $(api_url):" >&2
  echo "${msg:-$out}" >&2
  echo "deploy: is the server up (make stack-up) and is PREFECT_API_URL right?" >&2
  exit 1
fi
prefect --no-prompt deploy --name "$deployment"
