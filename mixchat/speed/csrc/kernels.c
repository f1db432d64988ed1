/*
 * kernels.c: matrix-vector kernels for one-token-at-a-time decoding on CPU, and a GEMM for prompts (see
 * gemm.c: from mc_get_gemm_min_rows() rows of x on, every entry point but mc_linear_int4_q8 hands
 * over to it).
 *
 * Decoding reads every weight once per token, so these kernels are judged by how close they get to the
 * memory read limit, not by FLOPs. All of them:
 *   - take x as fp32 [T, K] (T small) and write y as fp32 [T, N], y[t, n] = sum_k w[n, k] * x[t, k];
 *   - read each weight row once for all T rows of x (up to 8; 4 for exact int4; more rows are done in
 *     slices), so T = 4 costs about the same memory traffic as T = 1;
 *   - give each thread one contiguous range of output rows, so it streams its own part of the weight
 *     (simple sequential streams for the hardware prefetchers), and let a thread that is through its
 *     range take chunks from the end of the others' (mc_run_jobs), so no core idles while another
 *     reads;
 *   - accumulate in fp32 in enough independent registers (R rows x T tokens x S splits, about 8) to
 *     hide FMA latency; R rows share each load of x.
 *
 * Every weight row re-reads all of x (T * K * 4 bytes); past L1 (32 KiB per core on Zen 3) those loads
 * come from L2. Where that is what limits (bf16 at T >= 3: T FMAs and 2T/R bytes of x per weight byte),
 * K is cut into chunks whose x fits in ~16 KiB, rows are taken in blocks of MC_RB, and each block walks
 * the chunks in turn (partial sums kept in a small array). Elsewhere chunking measured slower than
 * streaming whole rows (it breaks the weight into short runs), so KC = K there.
 *
 * int4 prompts (Q8 x, more than 8 rows; bf16 and int8 prompts take the GEMM from its row count on) go
 * through the same 8-row kernels, but each block of weight rows meets every slice of x before the next
 * block (int4q8_sliced), so the weights stream from memory once per 128 rows of x rather than once per 8.
 *
 * Weights are also prefetched in software, g_pf[format][row kind] bytes (MC_PF unless set) ahead in the
 * thread's order of reads (mc_pf): while the core also converts and multiplies, the hardware prefetchers
 * alone do not keep enough cache misses in flight to approach the read limit (measured: +10-40% on AVX2 EPYC
 * and Xeon). On Zen 5 the same prefetches cost 15-20 %, so the distance is a runtime setting
 * (mc_set_prefetch, 0: none) per format and row length that the Python side chooses by measuring both on
 * the machine. The GEMM's packing (gemm.c) keeps the compile-time MC_PF.
 *
 * Weight formats:
 *   bf16  w uint16 [N, K] (bf16 bits). Any K (the last K % 32 columns go through scalar code).
 *   int8  q int8 [N, K] and scale fp32 [N]: w = scale[n] * q. Any K. mc_linear_int8 keeps fp32
 *         activations (exact); mc_linear_int8_q8 rounds x to int8 per 32 columns (K % 32 == 0) and
 *         uses integer multiply-adds, the only way a core keeps up with the memory read rate.
 *   int4  packed uint8 [N, K/2] (low nibble = even k, high nibble = odd k, values 0..15), scale and zero
 *         fp16 [N, K/G] (uint16 bits, widened exactly; fp32 before ABI 12): w = (q - 8) * scale + zero. K % 64 == 0 and G in {32, 64, 128}.
 *         mc_linear_int4 keeps fp32 activations (exact). mc_linear_int4_q8 rounds x to int8 in blocks
 *         of 32 (one fp32 scale each, like llama.cpp's Q8_0) and uses integer multiply-adds: turning
 *         nibbles into fp32 costs more ALU time than half a byte per weight of memory traffic leaves,
 *         so only the Q8 path reaches the read limit, above all for T > 1.
 *
 * Built with -march=native by mixchat/speed/kernels.py (MIXCHAT_KERNEL_ISA picks another build); where the
 * compiler does not target AVX2+FMA, or MC_PORTABLE is defined (the portable build, which pins this path
 * on any CPU), the portable scalar loops (in each format's part) are compiled instead (correct, slow) and
 * mc_simd() reports 0.
 * Rounding in the Q8 path relies on the default MXCSR mode (round to nearest even).
 *
 * Where the compiler targets AVX-512 F/BW/VL (-march=native on such a CPU), the bf16, int8 Q8 and int4 Q8
 * row kernels are AVX-512 ones (with vpdpbusd under AVX512_VNNI), each beside its AVX2 twin in the same
 * file (#if MC_AVX512); the avx2 build (-march=x86-64-v3) always compiles the AVX2 twins, so one AVX-512
 * machine tests both. mc_simd_level() says which (0 portable, 1 AVX2, 2 AVX-512, 3 AVX-512 + VNNI). With
 * AVX512-BF16 the GEMM also has a vdpbf16ps tile for bf16 and int8 weights (x rounded to bf16; gemm.c),
 * which mc_bf16dot() reports. The exact fp32-activation int8/int4 kernels, the transposed bf16 paths and
 * decode.c's arithmetic are AVX2 code in every SIMD build.
 *
 * The one file compiled (a unity build: every part is included here, in this order, so the compiler sees
 * one translation unit and inlines across parts exactly as it did when they were one file):
 *   common.h   includes, macros, tunables, the thread pool and jobs, thread-local scratch, bf16 -> fp32,
 *              the row driver and accumulator macros every SIMD format uses
 *   bf16.c     bf16 weights: row kernels and x preparation
 *   int8.c     int8 weights: fp32 activations (exact) and int8 activations (Q8)
 *   int4.c     int4 weights: fp32 activations (exact) and int8 activations (Q8)
 *   gemm.c     the register-tiled GEMM for prompts (all formats) and the transposed bf16 paths
 *   onepass.c  the multi-weight one-pass driver and the exported mc_linear_* entry points
 *   decode.c   one decoded token through a whole layer (uses one_pass)
 *   probe.c    mc_read_probe: the read rate of the widest loads this build has (the ceiling)
 * Parts are not compiled on their own: each relies on what the parts before it define.
 */
#include "common.h"
#include "bf16.c"
#include "int8.c"
#include "int4.c"
#include "gemm.c"
#include "onepass.c"
#include "decode.c"
#include "probe.c"
