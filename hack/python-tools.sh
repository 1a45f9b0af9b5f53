#!/usr/bin/env bash
# Installs the Python clients the tests call the frontend with into a virtualenv, once per
# version: the official `openai` package (OPENAI_PYTHON_VERSION in versions.env), from
# PyPI. A second run only prints the path.
#
#   $SWITCHYARD_CACHE_DIR/tools/python-openai-<version>/venv/bin/python
#
# Prints that python on stdout (progress on stderr).
# Usage: hack/python-tools.sh
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=versions.env
source "$repo/hack/versions.env"

cache=${SWITCHYARD_CACHE_DIR:-$HOME/.cache/switchyard}
dir="$cache/tools/python-openai-$OPENAI_PYTHON_VERSION"
venv="$dir/venv"

if [[ -x "$venv/bin/python" && -f "$dir/.complete" ]]; then
  echo "$venv/bin/python"
  exit 0
fi

python=$(command -v python3.11 || command -v python3)
rm -rf "$dir"
mkdir -p "$dir"
echo "python-tools: installing openai==$OPENAI_PYTHON_VERSION from PyPI into $venv" >&2
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "openai==$OPENAI_PYTHON_VERSION" >&2
touch "$dir/.complete"
echo "$venv/bin/python"
