#!/usr/bin/env bash
# Add an S3 DVC remote on this machine only, so data/raw, data/processed and models/ can be
# pushed to and pulled from S3 (a cluster's nodes, CI, a colleague):
#
#     infra/cloud/dvc-s3-remote.sh s3://my-bucket/dltrain/dvc            # add `s3remote`
#     infra/cloud/dvc-s3-remote.sh s3://my-bucket/dltrain/dvc --default  # ... and use it by default
#     dvc push -r s3remote        # or plain `dvc push` with --default
#
# It writes .dvc/config.local (DVC keeps that file out of git), so the repo's committed default
# remote stays `local` (../.dvcstore). No credentials are written anywhere: DVC's S3 client
# (boto3) reads them from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
# AWS_PROFILE, or the node's IAM role). Pushing needs the S3 plugin:
#     .venv/bin/pip install 'dvc[s3]==3.67.1'
set -euo pipefail
cd "$(dirname "$0")/../.."
url="${1:-}"
if [[ "$url" != s3://?* ]]; then
  echo "usage: $0 s3://bucket/path [--default]" >&2
  exit 2
fi
dvc remote add --local --force s3remote "$url"
if [[ "${2:-}" == "--default" ]]; then
  dvc remote default --local s3remote
fi
dvc remote list --local
