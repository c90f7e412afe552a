#!/usr/bin/env bash
# Create .venv (if missing) and install autohdr with its test tools and the lightning extra at the pinned versions.
# Idempotent: a second run only checks that everything is installed.
#
# Speed on a fresh machine: Chromium (apt-get) installs in the background while the packages install.
# They are byte-compiled right after they install, on purpose: with PYTHONDONTWRITEBYTECODE set (as on these
# machines) nothing compiled later is kept, and every process would compile torch again (~6 s each).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($PYTHON --version)" >&2
  "$PYTHON" -m venv .venv
fi

# Chromium (Debian package) for the report's headless-browser test. Installed only when missing, as
# root, with apt-get; never fatal. When it cannot be installed, the reason goes to
# .venv/.chromium-unavailable and that one test skips with it.
install_chromium() {
  local marker=.venv/.chromium-unavailable
  if command -v chromium >/dev/null 2>&1; then
    rm -f "$marker"
  elif [ "$(id -u)" != 0 ]; then
    echo "not root: scripts/bootstrap.sh cannot apt-get install chromium" > "$marker"
  elif ! command -v apt-get >/dev/null 2>&1; then
    echo "no apt-get on this system to install chromium with" > "$marker"
  else
    echo "bootstrap: installing chromium with apt-get (for the report.html browser test), in the background" >&2
    if { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
         || { apt-get update -qq >/dev/null 2>&1 \
              && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; }; }; then
      rm -f "$marker"
    else
      echo "bootstrap: could not install chromium; the browser test will be skipped" >&2
      echo "apt-get install chromium failed (no package source reachable?)" > "$marker"
    fi
  fi
}
install_chromium &
chromium_job=$!

# The packages go in with uv when it can be had (pip install uv, ~2 s): it downloads and unpacks in parallel
# (1.7 s from a warm cache), then compile_site_packages byte-compiles on both cores; ~17 s in all against
# pip's 55 s for this set on a 2-core machine. uv does not read pip's configuration, so it is given pip's find-links (where
# the torch CPU wheel lies on these machines); without them it falls back to pip, as on any failure.
install_with_uv() {
  local links
  links="${PIP_FIND_LINKS:-$(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)}"
  [ -n "$links" ] || return 1
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt uv >/dev/null 2>&1 || return 1
  local args=() link
  for link in $links; do args+=(--find-links "$link"); done
  .venv/bin/uv pip install --quiet --python .venv/bin/python "${args[@]}" \
    -c constraints.txt -e ".[test,lightning]" || return 1
  compile_site_packages
}

# Byte-compile the installed packages on every core, except trees no process of the main job or the
# test suite imports (found by running both with bytecode writing on: not one .pyc written there):
# test folders, networkx, setuptools, aiohttp, jinja2, pip, numpy.distutils, sympy.physics and torch's
# inductor code generators (and one torch test file in Python 3.12 syntax). ~7k of the 10.8k files: 14-15 s against uv's
# --compile-bytecode of everything, 19 s, on 2 cores (2026-12-04). A module left out still works:
# the process that imports it compiles it (and, with PYTHONDONTWRITEBYTECODE, does so every time).
compile_site_packages() {
  local site
  site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  .venv/bin/python -m compileall -q -j 0 \
    -x '/(tests|networkx|setuptools|aiohttp|jinja2|pip)/|/numpy/distutils/|/sympy/physics/|/torch/_inductor/(codegen|fx_passes)/|/py312_intrinsics\.py$' \
    "$site" >/dev/null 2>&1 || echo "bootstrap: some packages could not be byte-compiled (they still run)" >&2
}

stamp=.venv/.autohdr-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ] \
   || [ scripts/bootstrap.sh -nt "$stamp" ]; then
  echo "bootstrap: installing autohdr[test,lightning] with constraints.txt (torch 2.13.0 CPU build)" >&2
  if ! install_with_uv; then
    echo "bootstrap: uv unavailable or failed; installing with pip (slower)" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,lightning]"
  fi
  touch "$stamp"
fi
wait "$chromium_job"   # never fatal: install_chromium records why it could not install instead
