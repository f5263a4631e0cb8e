"""scripts/llama-cmake-args.sh: the CMake flags `make install` builds llama.cpp with.

The AMX and AVX-512 guards are tested with a stand-in probe that dies of SIGILL, as an
instruction does on a virtual machine that reports it and then refuses it; the real probe
(scripts/cpu-probe.c) is tested against what this machine's kernel reports in /proc/cpuinfo.
"""

import platform
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
NO_AMX = "-DGGML_NATIVE=ON -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"
AVX2 = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
x86_only = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 probes")


def flags(tmp_path: Path, avx512: str, amx: str) -> str:
    """The script's flags with a probe that, per family, exits 0 or 1, or dies of SIGILL ("ill")."""
    action = {"0": "exit 0", "1": "exit 1", "2": "exit 2", "ill": "kill -ILL $$"}
    probe = tmp_path / "probe"
    probe.write_text(f'#!/bin/sh\ncase "$1" in avx512) {action[avx512]} ;; amx) {action[amx]} ;; esac\n')
    probe.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "CPU_PROBE": str(probe)}
    done = subprocess.run(["sh", str(SCRIPTS / "llama-cmake-args.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@x86_only
def test_amx_kernels_only_where_tile_instructions_ran(tmp_path):
    assert flags(tmp_path, avx512="0", amx="0") == "-DGGML_NATIVE=ON"
    assert flags(tmp_path, avx512="0", amx="ill") == NO_AMX  # reported, then refused: the VM that trapped
    assert flags(tmp_path, avx512="0", amx="2") == NO_AMX  # the kernel refused the tile state
    assert flags(tmp_path, avx512="0", amx="1") == NO_AMX  # not reported


@x86_only
def test_avx512_that_traps_falls_back_to_avx2(tmp_path):
    assert flags(tmp_path, avx512="ill", amx="0") == AVX2
    assert flags(tmp_path, avx512="1", amx="1") == NO_AMX  # no AVX-512: native has none either


@x86_only
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_probe_agrees_with_the_kernel(tmp_path):
    """The probe runs AVX-512 exactly where the kernel lists avx512f/bw, AMX where it lists amx_tile/int8."""
    subprocess.run(["cc", "-O1", "-o", str(tmp_path / "probe"), str(SCRIPTS / "cpu-probe.c")], check=True)
    cpu_flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    listed = set(cpu_flags.split(":", 1)[1].split())
    for family, needed in (("avx512", {"avx512f", "avx512bw"}), ("amx", {"amx_tile", "amx_int8"})):
        status = subprocess.run([str(tmp_path / "probe"), family]).returncode
        assert status != -signal.SIGILL, f"{family} trapped: make install would build without it"
        if needed <= listed:
            assert status in (0, 2), family  # 2: AMX listed, tile state refused by the kernel
        else:
            assert status == 1, family
