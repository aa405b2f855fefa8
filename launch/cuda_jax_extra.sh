#!/usr/bin/env bash
# cuda_jax_extra.sh: prints the pip extra of jax that matches this host's NVIDIA driver,
# 'cuda13' or 'cuda12', read off `nvidia-smi` ("CUDA Version: 13.0" is the newest CUDA
# the driver runs). jax's CUDA wheels bring their own CUDA and cuDNN libraries, so the
# driver is all the host needs. Exits 1, saying why, when no NVIDIA driver answers.
#
# Used by `make install-gpu` and launch/gpu_host.sh (--jax-extra=auto).
set -euo pipefail

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "cuda_jax_extra.sh: nvidia-smi not found: is this a GPU host with the NVIDIA driver installed?" >&2
  exit 1
fi
version="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1)"
if [[ -z "$version" ]]; then
  echo "cuda_jax_extra.sh: nvidia-smi did not report a CUDA version (is the driver loaded?)" >&2
  exit 1
fi
if ((version >= 13)); then
  echo cuda13
elif ((version == 12)); then
  echo cuda12
else
  echo "cuda_jax_extra.sh: the driver supports CUDA $version; jax needs CUDA 12 or 13: update the NVIDIA driver (>= 525 for CUDA 12)" >&2
  exit 1
fi
