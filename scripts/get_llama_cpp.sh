#!/usr/bin/env bash
# Fetch llama.cpp's GGUF converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py) for the llama.cpp
# check of tests/test_export.py. PyPI has no package of the converter itself (the `gguf` package is only its
# library), but llama-cpp-python's source distribution vendors llama.cpp whole, so pip fetches it from there.
# Usage: bash scripts/get_llama_cpp.sh [DEST]   (default: $NANOVLM_LLAMA_CPP or ~/.cache/nanovlm/llama.cpp)
set -euo pipefail
VERSION=0.3.36
DEST="${1:-${NANOVLM_LLAMA_CPP:-$HOME/.cache/nanovlm/llama.cpp}}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python -m pip download "llama-cpp-python==$VERSION" --no-deps --no-binary :all: -d "$tmp" -q
src="llama_cpp_python-$VERSION/vendor/llama.cpp"
tar xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$tmp" "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py"
mkdir -p "$DEST"
cp -r "$tmp/$src/." "$DEST/"
python -m pip install -q sentencepiece  # the converter's Llama vocabulary path imports it
echo "llama.cpp converter in $DEST (run it with PYTHONPATH=$DEST/gguf-py)"
