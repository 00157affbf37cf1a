#!/usr/bin/env bash
# Set-up and entry point on a fresh CPU machine:
#   scripts/dev.sh demo [args]   runs the main job (python -m nftcore.train) on its embedded default
#   scripts/dev.sh test [args]   runs the whole test suite
# Creates .venv (or $NFTCORE_VENV) on first use with the exact CPU pins of constraints/cpu.txt; torch is installed
# first and builds run without isolation, so nothing can pull a CUDA build of torch. The install builds the native CPU
# kernels (csrc/, CMake; NFTCORE_SKIP_NATIVE=1 skips them) and prints one line saying whether they were built; a later
# run rebuilds them when csrc/ or CMakeLists.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${NFTCORE_VENV:-.venv}
python=${PYTHON:-python3}
stamp="$venv/.nftcore-setup"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
native_changed() { [ -n "$(find csrc CMakeLists.txt -newer "$stamp" 2>/dev/null | head -n 1)" ]; }
if [ ! -f "$stamp" ] || [ constraints/cpu.txt -nt "$stamp" ] || [ setup.py -nt "$stamp" ] || native_changed; then
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints/cpu.txt)
  "${pip[@]}" setuptools wheel
  "${pip[@]}" torch pybind11  # the native build (setup.py -> CMake) needs both before the project installs
  "${pip[@]}" --no-build-isolation -e '.[dev,diffusers]'
  "$venv/bin/python" -m nftcore._native >&2 || true  # one line: native kernels built, skipped or failed (and why)
  touch "$stamp"
fi

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  demo) exec "$venv/bin/python" -m nftcore.train "$@" ;;
  test) exec "$venv/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: scripts/dev.sh {demo|test} [args...]" >&2; exit 2 ;;
esac
