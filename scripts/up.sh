#!/usr/bin/env bash
# Runs hookmesh locally: installs nats-server and the wasm target if
# missing, builds the example handlers and hookmesh, and runs `hookmesh up`
# (which starts nats-server itself when none answers on the configured URL
# and deploys the handlers of ./handlers, again whenever one is rebuilt).
# Extra arguments go to `hookmesh up`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/prereqs.sh

ensure_nats_server
build_handlers
exec cargo run --release --quiet -p hookmesh -- up "$@"
