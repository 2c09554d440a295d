#!/usr/bin/env bash
# Prepare a machine to run battery-trace: Python >= 3.11 with venv, the project in .venv, the
# mosquitto broker (the demo and the integration tests start private brokers of their own) and, when
# BT_NEED_POSTGRES is set (the tests), PostgreSQL's server programs for private test clusters and
# Chromium with its driver for the dashboard's browser test.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it only does what is missing).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"

say() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo "$@"
  else return 1
  fi
}

apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  say "installing with apt: $*"
  if [ -z "${_apt_updated:-}" ]; then
    as_root apt-get update -qq || return 1
    _apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || return 1
}

python_ok() {
  "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

find_python() {
  for candidate in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 && python_ok "$(command -v "$candidate")"; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

if [ ! -x "$venv/bin/python" ]; then
  py="$(find_python || true)"
  if [ -z "$py" ]; then
    apt_install python3 python3-venv python3-pip || true
    py="$(find_python || true)"
  fi
  if [ -z "$py" ]; then
    say "need Python >= 3.11 with the venv module. On Debian/Ubuntu: sudo apt-get install python3 python3-venv"
    exit 1
  fi
  say "creating virtual environment with $py"
  "$py" -m venv "$venv"
fi

# Reinstall only when the dependencies or a C extension changed (a stamp of pyproject.toml and the C sources).
stamp="$venv/.installed-$(cat "$root/pyproject.toml" "$root"/*/_*.c | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  say "installing battery-trace and its dependencies into .venv (one time)"
  log="$venv/install.log"
  if ! { "$venv/bin/python" -m pip install --upgrade pip &&
         "$venv/bin/python" -m pip install -e "$root[dev]"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    say "installation failed; the whole log is in $log"
    exit 1
  fi
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi

find_mosquitto() {
  command -v mosquitto 2>/dev/null || { [ -x /usr/sbin/mosquitto ] && echo /usr/sbin/mosquitto; } || return 1
}
if ! find_mosquitto >/dev/null; then
  apt_install mosquitto || true
fi
if ! find_mosquitto >/dev/null; then
  say "need the mosquitto MQTT broker (2.x). On Debian/Ubuntu: sudo apt-get install mosquitto"
  exit 1
fi
export BT_MOSQUITTO="${BT_MOSQUITTO:-$(find_mosquitto)}"

# The tests also run the record on PostgreSQL, in private clusters they create with initdb.
if [ -n "${BT_NEED_POSTGRES:-}" ]; then
  find_initdb() {
    command -v initdb 2>/dev/null || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1
  }
  if [ -z "$(find_initdb)" ]; then
    apt_install postgresql || true
  fi
  if [ -z "$(find_initdb)" ]; then
    say "need PostgreSQL's server programs (initdb, pg_ctl). On Debian/Ubuntu: sudo apt-get install postgresql"
    exit 1
  fi
  # ...and the dashboard in a headless browser.
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    apt_install chromium chromium-driver || true
  fi
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    say "need Chromium and its driver for the browser test. On Debian: sudo apt-get install chromium chromium-driver"
    exit 1
  fi
fi
