#!/usr/bin/env bash
# Runs hookmesh locally: installs nats-server and the wasm target if
# missing, builds the example handlers, the mock ERP and hookmesh, and runs
# `hookmesh up` (which starts nats-server itself when none answers on the
# configured URL, starts the mock ERP on 127.0.0.1:8090 when nothing
# answers there, and deploys the handlers of ./handlers, again whenever one
# is rebuilt). Extra arguments go to `hookmesh up`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/prereqs.sh

ensure_nats_server
build_handlers
# Beside hookmesh in target/release, where `up` looks for it.
cargo build --release --quiet -p hookmesh-mock-erp
exec cargo run --release --quiet -p hookmesh -- up "$@"
