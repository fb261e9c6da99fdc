#!/usr/bin/env bash
# The local stack: a real Prefect server, an S3-protocol server (moto) with a bucket and,
# with --ray, a Ray head, all on 127.0.0.1. `up` writes an env file to source; `down` stops
# exactly the process groups that `up` started (pid files), nothing else.
#
#   infra/stack.sh up [--ray]     start (idempotent: running parts are kept)
#   infra/stack.sh status         what runs, and the env file
#   infra/stack.sh down           stop everything this stack started
#
# Settings (environment): CHORUS_STACK_DIR (default .chorus/stack), CHORUS_STACK_PREFECT_PORT
# (4200), CHORUS_STACK_S3_PORT (9000), CHORUS_STACK_RAY_PORT (6379), CHORUS_STACK_BUCKET
# (chorus), PREFECT_SERVER_DATABASE_CONNECTION_URL (default SQLite in the stack folder; a
# postgresql+asyncpg:// URL for production).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${root}/.venv/bin"
dir="${CHORUS_STACK_DIR:-${root}/.chorus/stack}"
prefect_port="${CHORUS_STACK_PREFECT_PORT:-4200}"
s3_port="${CHORUS_STACK_S3_PORT:-9000}"
ray_port="${CHORUS_STACK_RAY_PORT:-6379}"
bucket="${CHORUS_STACK_BUCKET:-chorus}"
env_file="${dir}/env"

die() { echo "stack: $*" >&2; exit 2; }

running() { # running NAME: its process group is alive
  local pid_file="${dir}/$1.pid"
  [[ -f "$pid_file" ]] && kill -0 -- "-$(cat "$pid_file")" 2>/dev/null
}

launch() { # launch NAME COMMAND...: in a new session, so `down` can stop the whole group
  local name="$1"; shift
  (
    # Long-lived servers must not inherit the caller's descriptors (a held lock, a pipe).
    for fd in /proc/self/fd/*; do
      fd="${fd##*/}"
      if (( fd > 2 )); then eval "exec ${fd}>&-" 2>/dev/null || true; fi
    done
    exec setsid "$@" >"${dir}/$name.log" 2>&1 < /dev/null
  ) &
  echo $! >"${dir}/$name.pid"
}

wait_for() { # wait_for NAME SECONDS CHECK...: poll CHECK until it succeeds
  local name="$1" seconds="$2"; shift 2
  for _ in $(seq "$((seconds * 2))"); do
    "$@" >/dev/null 2>&1 && return 0
    running "$name" || die "$name exited; see ${dir}/$name.log"
    sleep 0.5
  done
  die "$name did not answer within ${seconds} s; see ${dir}/$name.log"
}

up() {
  [[ -x "${bin}/prefect" ]] || die "no ${bin}/prefect: run 'make setup' first"
  mkdir -p "$dir"
  if ! running prefect; then
    PREFECT_HOME="${dir}/prefect-home" \
    PREFECT_SERVER_DATABASE_CONNECTION_URL="${PREFECT_SERVER_DATABASE_CONNECTION_URL:-sqlite+aiosqlite:///${dir}/prefect.db}" \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
      launch prefect "${bin}/prefect" server start --host 127.0.0.1 --port "$prefect_port"
  fi
  if ! running s3; then
    launch s3 "${bin}/moto_server" -H 127.0.0.1 -p "$s3_port"
  fi
  if [[ "${1:-}" == "--ray" ]] && ! running ray; then
    RAY_AUTH_MODE=disabled launch ray "${bin}/ray" start --head --block \
      --node-ip-address 127.0.0.1 --port "$ray_port" --include-dashboard false \
      --disable-usage-stats
  fi
  wait_for s3 30 curl -sf "http://127.0.0.1:${s3_port}/"
  curl -sf -X PUT "http://127.0.0.1:${s3_port}/${bucket}" >/dev/null  # idempotent in moto
  wait_for prefect 120 curl -sf "http://127.0.0.1:${prefect_port}/api/health"
  if running ray; then
    wait_for ray 60 "${bin}/ray" status --address "127.0.0.1:${ray_port}"
  fi
  {
    echo "export PREFECT_API_URL=http://127.0.0.1:${prefect_port}/api"
    echo "export AWS_ENDPOINT_URL=http://127.0.0.1:${s3_port}"
    echo "export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1"
    echo "export CHORUS_STORE=s3://${bucket}/store"
    if running ray; then echo "export RAY_ADDRESS=127.0.0.1:${ray_port}"; fi
  } >"$env_file"
  status
  echo "source ${env_file}   # to use it; Prefect UI: http://127.0.0.1:${prefect_port}"
}

status() {
  local name
  for name in prefect s3 ray; do
    if running "$name"; then
      echo "$name: running (process group $(cat "${dir}/$name.pid"))"
    elif [[ -f "${dir}/$name.pid" ]]; then
      echo "$name: stopped (stale pid file)"
    else
      echo "$name: not started"
    fi
  done
  if [[ -f "$env_file" ]]; then cat "$env_file"; fi
}

down() {
  local name pgid
  for name in ray prefect s3; do
    [[ -f "${dir}/$name.pid" ]] || continue
    pgid="$(cat "${dir}/$name.pid")"
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pgid" 2>/dev/null || true
    rm -f "${dir}/$name.pid"
    echo "$name: stopped"
  done
  rm -f "$env_file"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  status) status ;;
  *) die "usage: infra/stack.sh up [--ray] | status | down" ;;
esac
