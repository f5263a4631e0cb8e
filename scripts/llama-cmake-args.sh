#!/bin/sh
# Print the CMake flags that build llama.cpp (through llama-cpp-python) for the CPU this runs on.
#
#   sh scripts/llama-cmake-args.sh      -> e.g. -DGGML_NATIVE=ON -DCMAKE_C_FLAGS=-mno-amx-int8 ...
#
# The Makefile's default LLAMA_CMAKE_ARGS; `make install LLAMA_CMAKE_ARGS=...` replaces it.
# x86-64: -march=native (every kernel this CPU has: AVX-512, VNNI, BF16, AVX-VNNI...), after
# scripts/cpu-probe.c has *run* the instructions that -march=native would use and a virtual
# machine may report and then refuse:
#   - AVX-512 reported but trapping  -> the AVX2 build (molting's flags before 2026-12-05);
#   - AMX not run to completion      -> native without ggml's AMX kernels (-mno-amx-int8 removes
#     __AMX_INT8__, the only switch of ggml-cpu/amx/*), so ggml_backend_amx_mul_mat is never built.
# Other architectures: -DGGML_NATIVE=ON. The reason goes to stderr, the flags to stdout.
set -u
here=$(dirname "$0")
avx2="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
no_amx="-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"

case $(uname -m) in
    x86_64 | amd64) ;;
    *) echo "llama.cpp: native build for $(uname -m)" >&2; echo "-DGGML_NATIVE=ON"; exit 0 ;;
esac
dir=$(mktemp -d) || { echo "$avx2"; exit 0; }
trap 'rm -rf "$dir"' EXIT
if ! ${CC:-cc} -O1 -o "$dir/probe" "$here/cpu-probe.c" 2>"$dir/cc.log"; then
    echo "llama.cpp: AVX2 build (could not compile scripts/cpu-probe.c: $(head -c 200 "$dir/cc.log"))" >&2
    echo "$avx2"
    exit 0
fi
# Each probe runs in its own process: an illegal instruction kills the probe, not this script.
("$dir/probe" avx512) 2>/dev/null
avx512=$?
if [ "$avx512" -gt 1 ]; then
    echo "llama.cpp: AVX2 build (this CPU reports AVX-512 and refused it: probe status $avx512)" >&2
    echo "$avx2"
    exit 0
fi
("$dir/probe" amx) 2>/dev/null
amx=$?
if [ "$amx" -eq 0 ]; then
    echo "llama.cpp: native build with AMX (tile instructions ran)" >&2
    echo "-DGGML_NATIVE=ON"
else
    echo "llama.cpp: native build without AMX kernels (AMX probe status $amx: 1 absent, 2 refused, 132 trapped)" >&2
    echo "-DGGML_NATIVE=ON $no_amx"
fi
