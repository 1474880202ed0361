#!/usr/bin/env bash
# Install everything (if needed), lint, and run the default test suite (tests marked slow are left to test-slow.sh);
# then, on x86-64, the tests of the kernels, the model forward, the engine and the server again on the code paths of
# an AVX2-only CPU, and a smoke set on AVX-512 without BF16 and on portable C++ (SPINDLE_CPU_PROFILE:
# kernels/cpu_profile.py). With arguments, one pytest run with them instead, on this CPU's own profile.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
scripts/install-arm64-tools.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
pytest=(.venv/bin/python -m pytest)
if [ $# -gt 0 ]; then
  exec "${pytest[@]}" "$@"
fi
"${pytest[@]}"
[ "$(uname -m)" = x86_64 ] || exit 0
kernels=(tests/test_cpu_profile.py tests/test_cpu_attention.py tests/test_layer_ops.py tests/test_linear_f32.py
  tests/test_linear_q8.py tests/test_int4_weights.py tests/test_int8_weights.py tests/test_bucketed_linear.py
  tests/test_amx_linear.py tests/test_attention_registry.py)
# (speculative verification steps are in test_native_decoder's runs)
model_and_engine=(tests/test_reference_greedy.py tests/test_native_decoder.py tests/test_prompt_logprobs.py
  tests/test_engine_batching.py tests/test_kv_cache_dtype.py tests/test_server_api.py)
SPINDLE_CPU_PROFILE=avx2 "${pytest[@]}" "${kernels[@]}" "${model_and_engine[@]}"
for profile in avx512 scalar; do
  SPINDLE_CPU_PROFILE=$profile "${pytest[@]}" "${kernels[@]}" tests/test_native_decoder.py
done
