#!/usr/bin/env bash
# Install everything (if needed), lint, and run the default test suite (tests marked slow are left to test-slow.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
