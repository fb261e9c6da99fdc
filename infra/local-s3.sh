#!/usr/bin/env bash
# An in-memory S3-protocol server on loopback for local experiments (data is lost on exit).
set -euo pipefail
port="${1:-9000}"
here="$(cd "$(dirname "$0")/.." && pwd)"
echo "export AWS_ENDPOINT_URL=http://127.0.0.1:${port} AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1" >&2
exec "${here}/.venv/bin/moto_server" -H 127.0.0.1 -p "${port}"
