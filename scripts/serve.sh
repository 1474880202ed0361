#!/usr/bin/env bash
# Install everything (if needed) and start the OpenAI-compatible server on the embedded default model.
# Extra arguments go to `spindle serve`, e.g. ./scripts/serve.sh --port 8080 --dtype float32
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/spindle serve "$@"
