/* Run one instruction family and report whether this CPU *and* its operating system allow it.
 *
 *   cpu-probe avx512   AVX-512F/BW/VNNI: one vpdpbusd on zmm registers
 *   cpu-probe amx      AMX-TILE/INT8: ask Linux for the tile state (arch_prctl), then
 *                      ldtilecfg, tilezero and tdpbssd, the instructions ggml's AMX matmul runs
 *
 * Exit status: 0 the instructions ran; 1 the CPU does not report them (CPUID);
 * 2 the kernel refused the AMX tile state; killed by SIGILL (shell status 132) when the CPU
 * reports them and then refuses them, as some virtual machines do. scripts/llama-cmake-args.sh
 * compiles and runs it at `make install`; nothing else uses it.
 * Sources: Intel SDM vol. 1 ch. 18 (AMX), Linux Documentation/arch/x86/xstate.rst.
 */
#include <cpuid.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

struct tile_config {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

static int leaf7(unsigned *ebx, unsigned *edx) {
    unsigned eax, ecx;
    if (!__get_cpuid_count(7, 0, &eax, ebx, &ecx, edx)) return 0;
    return 1;
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static int run_avx512(void) {
    volatile int one = 1;
    __m512i a = _mm512_set1_epi32(one);
    a = _mm512_dpbusd_epi32(a, a, a);
    int out[16];
    _mm512_storeu_si512(out, a);
    return out[0] == 2 ? 0 : 3;
}

__attribute__((target("amx-tile,amx-int8"))) static int run_amx(void) {
#ifdef __linux__
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) return 2;
#endif
    struct tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int i = 0; i < 3; i++) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = 16;
    }
    _tile_loadconfig(&cfg);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_dpbssd(0, 1, 2);
    _tile_release();
    return 0;
}

int main(int argc, char **argv) {
    unsigned ebx = 0, edx = 0;
    if (argc != 2 || !leaf7(&ebx, &edx)) return 1;
    if (strcmp(argv[1], "avx512") == 0) {
        if (!(ebx & (1u << 16)) || !(ebx & (1u << 30))) return 1; /* AVX512F, AVX512BW */
        return run_avx512();
    }
    if (strcmp(argv[1], "amx") == 0) {
        if (!(edx & (1u << 24)) || !(edx & (1u << 25))) return 1; /* AMX-TILE, AMX-INT8 */
        return run_amx();
    }
    fprintf(stderr, "usage: cpu-probe avx512|amx\n");
    return 64;
}
