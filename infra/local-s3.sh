#!/usr/bin/env bash
# A local S3-compatible server for development and tests: moto's server, bound to 127.0.0.1 only.
#
#   infra/local-s3.sh [PORT]            # default 9000; Ctrl-C stops it
#   export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1
#   python -c "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:9000').create_bucket(Bucket='rankfold')"
#
# Then point a job at it: output.store: {s3: {bucket: rankfold, endpoint_url: http://127.0.0.1:9000}}.
# Data lives in the server's memory: stopping it forgets every object. MinIO is not on PyPI/Debian;
# moto (pip install "moto[server]") speaks the same HTTP API for what rankfold uses.
set -euo pipefail
PORT="${1:-9000}"
exec moto_server -H 127.0.0.1 -p "$PORT"
