#!/bin/sh
# Which torch build a CUDA base image takes, and the constraints that match it.
#   sh docker/cuda_variant.sh CUDA_VERSION CONSTRAINTS_IN CONSTRAINTS_OUT   (prints torch's package index)
# requirements/constraints.txt pins the CUDA 13 runtime wheels that PyPI's torch depends on
# (nvidia-*, cuda-*, triton). The CUDA 12.8 build of the same torch version, from PyTorch's own
# index, depends on other wheels (nvidia-*-cu12) and pins them exactly itself; for it, the CUDA
# 13 pins are dropped and every other pin is kept, so both images share all non-CUDA versions.
set -eu
cuda=$1
constraints_in=$2
constraints_out=$3
case "$cuda" in
    13.0.*)
        cp "$constraints_in" "$constraints_out"
        echo "https://pypi.org/simple"
        ;;
    12.8.*)
        grep -viE '^(nvidia-|cuda-|triton==)' "$constraints_in" > "$constraints_out"
        echo "https://download.pytorch.org/whl/cu128"
        ;;
    *)
        echo "CUDA=$cuda: the image builds CUDA 13.0.x (torch from PyPI) or 12.8.x (torch from download.pytorch.org/whl/cu128)" >&2
        exit 1
        ;;
esac
