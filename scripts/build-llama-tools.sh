#!/bin/sh
# Build llama.cpp's own programs (llama-bench, llama-server, ...) from the llama-cpp-python
# source distribution that matches the installed llama-cpp-python, with the same CMake flags.
#
#   scripts/build-llama-tools.sh TARGET...        e.g. llama-bench llama-server
#
# Interface (also in docs/llama-cpp.md):
#   PYTHON            interpreter whose llama_cpp.__version__ is matched  [.venv/bin/python]
#   LLAMA_CMAKE_ARGS  CMake flags; default: $VENV/llama.cpp/cmake-args, written by `make install`
#                     with the flags the Python package was built with, else scripts/llama-cmake-args.sh
#   LLAMA_TOOLS_CACHE sdist and build trees  [${XDG_CACHE_HOME:-~/.cache}/molting/llama.cpp]
# Steps: `pip download --no-deps --no-binary :all: llama-cpp-python==VERSION` into the cache (once),
# unpack, configure vendor/llama.cpp once per (version, flags) in its own build directory (static
# libraries, no network: no curl, no OpenSSL, no prebuilt web UI), build the named targets, copy
# them to $VENV/llama.cpp/bin/ (VENV = the interpreter's sys.prefix) and print their paths.
# Several targets in one call share one configure; later calls reuse the build tree (incremental).
# Runs under a lock per build tree, so two callers never build the same tree at once.
# Exit status: 0 built; 1 a step failed (its output is on stderr); 2 bad usage.
set -eu
[ $# -ge 1 ] || { echo "usage: $0 TARGET..." >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || { echo "error: $python: no Python interpreter (run make install, or set PYTHON)" >&2; exit 2; }
version=$("$python" -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))") || {
    echo "error: llama-cpp-python is not installed in $python" >&2; exit 2; }
venv=$("$python" -c "import sys; print(sys.prefix)")
if [ -z "${LLAMA_CMAKE_ARGS+set}" ]; then
    if [ -f "$venv/llama.cpp/cmake-args" ]; then
        LLAMA_CMAKE_ARGS=$(cat "$venv/llama.cpp/cmake-args")
    else
        LLAMA_CMAKE_ARGS=$(sh "$root/scripts/llama-cmake-args.sh")
    fi
fi
cache=${LLAMA_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/molting/llama.cpp}
key=$(printf '%s' "$LLAMA_CMAKE_ARGS" | cksum | cut -d' ' -f1)
src=$cache/src/llama_cpp_python-$version
build=$cache/build/$version-$key
bin=$venv/llama.cpp/bin
mkdir -p "$cache/sdist" "$cache/src" "$cache/build" "$bin"

sdist=$(ls "$cache/sdist"/llama_cpp_python-"$version".tar.gz 2>/dev/null || true)
if [ -z "$sdist" ]; then
    echo "downloading the llama-cpp-python $version source distribution" >&2
    "$python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$cache/sdist" >&2
    sdist=$cache/sdist/llama_cpp_python-$version.tar.gz
fi
if [ ! -f "$src/.unpacked" ]; then
    rm -rf "$src.tmp" && mkdir -p "$src.tmp"
    tar -xzf "$sdist" -C "$src.tmp" --strip-components=1
    touch "$src.tmp/.unpacked" && rm -rf "$src" && mv "$src.tmp" "$src"
fi

exec 9>"$build.lock"
flock 9
if [ ! -f "$build/CMakeCache.txt" ]; then
    # shellcheck disable=SC2086  # LLAMA_CMAKE_ARGS is a list of words
    cmake -S "$src/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF $LLAMA_CMAKE_ARGS >"$build.configure.log" 2>&1 || {
        tail -30 "$build.configure.log" >&2; rm -rf "$build"; exit 1; }
    printf '%s\n' "$LLAMA_CMAKE_ARGS" >"$build/cmake-args"
fi
cmake --build "$build" --config Release -j "$(nproc 2>/dev/null || echo 2)" --target "$@" >&2
for target in "$@"; do
    cp "$build/bin/$target" "$bin/.$target.tmp" && mv "$bin/.$target.tmp" "$bin/$target"
    echo "$bin/$target"
done
