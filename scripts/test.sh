#!/usr/bin/env bash
# The whole hookmesh test suite: every test against the machine's
# nats-server (Debian's 2.9.x), then the end-to-end tests again against a
# pinned current release. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/prereqs.sh

ensure_nats_server
ensure_postgres
ensure_nextest
ensure_promtool
ensure_browser_test
build_handlers
# The alert-rule and browser tests skip when their tools are missing; here
# that is a failure.
export REQUIRE_TEST_TOOLS=1
pinned=$(pinned_nats_server)
system=$(command -v nats-server || echo /usr/sbin/nats-server)
[ -x /usr/sbin/nats-server ] && system=/usr/sbin/nats-server

# Everything, the `hookmesh` binary the end-to-end tests run included, with
# the same features the test run unifies (so nothing is compiled twice).
cargo build --workspace --all-targets

echo "== all tests, nats-server $("$system" --version) ($system)"
NATS_SERVER_BIN="$system" cargo nextest run --workspace --no-fail-fast

echo "== end-to-end tests, nats-server $("$pinned" --version) ($pinned)"
# --workspace with a filter, not -p: the same package set keeps the same
# feature unification, so nothing is rebuilt. What does not depend on the
# server's version runs once, in the first pass: the console's browser test,
# the `outbound::` tests (the wasm runtime against an HTTP server, no NATS),
# the outbox tests and the PostgreSQL helpers. The 60-second soak runs once
# too, to keep the suite's time.
NATS_SERVER_BIN="$pinned" cargo nextest run --workspace --no-fail-fast \
  -E '(package(hookmesh-e2e) - test(/^outbound::/) - test(/the_console_in_a_browser/) - test(/^outbox::/) - test(/^soak::/)) | (package(hookmesh-test-support) - test(/^postgres::/))'
