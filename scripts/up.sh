#!/usr/bin/env bash
# Runs hookmesh locally: installs nats-server if missing, builds, and runs
# `hookmesh up` (which starts nats-server itself when none answers on the
# configured URL). Extra arguments go to `hookmesh up`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/prereqs.sh

ensure_nats_server
exec cargo run --release --quiet -p hookmesh -- up "$@"
