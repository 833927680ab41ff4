#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (CPU torch), then runs a job.
#   scripts/dev.sh demo        the main job: a demo on the built-in tiny model
#   scripts/dev.sh test        ruff + import-linter + basedpyright + the whole test suite (installs chromium for
#                              browser tests)
#   scripts/dev.sh quick       the inner loop: the same checks + the tests not marked slow (no swarms, no browser)
#   scripts/dev.sh setup       only create/refresh .venv
#   scripts/dev.sh meshinfer … any meshinfer command inside the venv
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="${PYTHON:-python3}"

pip_install() {
  # pip prints one warning per missing local index entry; keep real errors, drop that noise.
  local rc
  set +e
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location"
  rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}

setup() {
  if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
  fi
  # Re-install only when the dependency list changed (stamp = hash of pyproject.toml).
  local stamp="$venv/.meshinfer-stamp" want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # CPU torch first and as a constraint: the pinned release resolves to the local +cpu wheel
    # where the machine has one, so nothing pulls CUDA packages.
    echo "torch==2.13.0" > "$venv/constraints.txt"
    pip_install -c "$venv/constraints.txt" "torch==2.13.0"
    pip_install -c "$venv/constraints.txt" -e ".[dev]"
    echo "$want" > "$stamp"
  fi
  netns_setup
}

apt_optional() {
  # apt_optional PACKAGE PRESENT_TEST WHAT: install a Debian package some tests need when it is missing and we can
  # (root, apt-get); never fail the run: without it those tests skip, saying why.
  local pkg="$1" present="$2" what="$3"
  eval "$present" && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing $pkg for $what"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "$pkg" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "$pkg" >/dev/null 2>&1; } \
      || echo "warning: could not install $pkg; $what will be skipped" >&2
  else
    echo "note: $pkg is missing (installing it needs root and apt-get); $what will be skipped" >&2
  fi
  return 0
}

netns_setup() {
  # The namespaced-LAN tests (tests/integration/test_lan_mdns.py) need `ip` (iproute2) and root.
  apt_optional iproute2 "command -v ip >/dev/null 2>&1" "the network-namespace tests"
  apt_optional iptables "command -v iptables >/dev/null 2>&1" "the NATed-namespace test (masquerading)"
}

browser_setup() {
  # The browser tests (tests/dashboard) drive Debian's chromium through Playwright.
  apt_optional chromium "[ -x /usr/bin/chromium ]" "the browser tests"
}

cmd="${1:-help}"
shift || true
case "$cmd" in
  setup) setup ;;
  test|quick)
    setup
    if [ "$cmd" = test ]; then browser_setup; fi
    export PATH="$venv/bin:$PATH"
    echo "== ruff"; ruff check src tests
    echo "== import-linter"; lint-imports --no-cache
    echo "== basedpyright"; basedpyright
    echo "== pytest"
    set +e
    if [ "$cmd" = quick ]; then
      pytest -m "not slow" "$@"
    else
      pytest "$@"
    fi
    rc=$?
    set -e
    # pytest exits 5 when it collected no test: that is a failure of the suite, not a pass.
    exit $rc
    ;;
  demo)
    setup
    exec "$venv/bin/meshinfer" demo "$@"
    ;;
  meshinfer)
    setup
    exec "$venv/bin/meshinfer" "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh {demo|test|quick|setup|meshinfer ARGS...}" >&2
    exit 2
    ;;
esac
