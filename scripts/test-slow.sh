#!/usr/bin/env bash
# Install everything (if needed) and run the slow tests only (long reference comparisons, exhaustive grids).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/python -m pytest -m slow "$@"
