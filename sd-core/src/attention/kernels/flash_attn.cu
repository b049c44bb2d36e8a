// Flash-attention forward for sd-core: O = softmax(scale * Q K^T [+ causal mask]) V over
// [batch, heads, seq, head_dim] tensors in f16 or bf16, with the scores, the softmax and the
// accumulation in f32 (SD 2.x's "upcast attention": half-precision scores overflow).
//
// FlashAttention-2 scheme: a block of WARPS warps owns 16 * WARPS query rows (16 per warp); it
// walks the keys in tiles of BC rows with an online softmax, so memory never grows with
// seq_q x seq_k. Q K^T and P V run on tensor cores (mma.sync m16n8k16, sm_80+) fed by ldmatrix from
// shared memory; K/V tiles are double-buffered with cp.async. For the VAE's head_dim 512 the output
// columns are split over blockIdx.z (DV columns per block) so the f32 accumulator fits in registers.
//
// Compiled at run time by NVRTC (sd-core/src/attention/cuda.rs) for the device's own architecture,
// and in CI for sm_80 and sm_90 (scripts/ci/check-cuda-kernels.sh). The source includes no header
// at all (not even cuda_fp16.h), so it compiles with libnvrtc alone on any machine. With
// FA_HOST_EMULATION defined it also builds as plain C++ against scripts/ci/fa_emulator.h, which
// emulates the few PTX instructions used here, so CI checks the kernels' numbers without a GPU.
//
// Kernel arguments (element strides; the last dimension must be contiguous, every stride and the
// base pointers 16-byte aligned, i.e. multiples of 8 elements):
//   q, k, v  inputs; o output, contiguous [batch, heads, seq_q, D]
//   seq_q, seq_k, heads
//   q_sb, q_sh, q_ss  strides of q for batch, head and sequence (likewise k_*, v_*)
//   scale_log2        softmax scale times log2(e)
//   causal            non-zero: key j is masked for query i when j > i (CLIP's text encoder)
// Launch: grid (ceil(seq_q / (16 * WARPS)), batch * heads, D / DV when DV < D else 1),
//         block 32 * WARPS threads, dynamic shared memory 2 * (16 * WARPS * SQ + 2 * BC * SQ +
//         2 * BC * SV) bytes with SQ, SV from FaGeom (sd-core's Rust side computes the same numbers
//         from the table at the end of this file).

typedef unsigned short fa_u16;
typedef unsigned int fa_u32;

// Element-type tags: they select the mma instruction and the f32 -> 16-bit conversion.
struct FaF16 {};
struct FaBf16 {};

#ifdef FA_HOST_EMULATION
#include "fa_emulator.h"
#else
#define FA_DEV static __device__ __forceinline__
#define FA_KERNEL_ATTR(threads) extern "C" __global__ void __launch_bounds__(threads)

FA_DEV fa_u32 fa_smem_addr(const void* p) {
  fa_u32 r;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i. Lane l receives
// (row l/4, columns 2(l%4), 2(l%4)+1) of each matrix; with .trans, of each transposed matrix.
FA_DEV void fa_ldmatrix_x4(fa_u32 (&r)[4], const fa_u16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(fa_smem_addr(p)));
}

FA_DEV void fa_ldmatrix_x4_trans(fa_u32 (&r)[4], const fa_u16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(fa_smem_addr(p)));
}

// d += a (16x16, row major) * b (16x8, column major), f32 accumulators.
#ifndef SD_FA_ONLY_BF16
FA_DEV void fa_mma(FaF16, float (&d)[4], const fa_u32 (&a)[4], fa_u32 b0, fa_u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

#ifndef SD_FA_ONLY_F16
FA_DEV void fa_mma(FaBf16, float (&d)[4], const fa_u32 (&a)[4], fa_u32 b0, fa_u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// Two f32 to a packed pair, `lo` in the low 16 bits (round to nearest even).
#ifndef SD_FA_ONLY_BF16
FA_DEV fa_u32 fa_pack(FaF16, float lo, float hi) {
  fa_u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
#endif

#ifndef SD_FA_ONLY_F16
FA_DEV fa_u32 fa_pack(FaBf16, float lo, float hi) {
  fa_u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
#endif

// 16 bytes global -> shared, asynchronously; zero-fills the destination when !valid.
FA_DEV void fa_cp_async16(fa_u16* dst, const fa_u16* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(fa_smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

FA_DEV void fa_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
FA_DEV void fa_cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

FA_DEV void fa_syncthreads() { asm volatile("bar.sync 0;\n" ::: "memory"); }

FA_DEV float fa_shfl_xor(float x, int mask) {
  float r;
  asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;\n" : "=f"(r) : "f"(x), "r"(mask));
  return r;
}

FA_DEV float fa_exp2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
}

FA_DEV float fa_neg_inf() {
  float r;
  asm("mov.b32 %0, 0xff800000;\n" : "=f"(r));
  return r;
}

FA_DEV float fa_max(float a, float b) { return a > b ? a : b; }

#define FA_THREAD_IDX threadIdx.x
#define FA_BLOCK_IDX_X blockIdx.x
#define FA_BLOCK_IDX_Y blockIdx.y
#define FA_BLOCK_IDX_Z blockIdx.z
#define FA_DYNAMIC_SMEM(name) extern __shared__ __attribute__((aligned(16))) fa_u16 name[]
#endif  // FA_HOST_EMULATION

// Tile geometry, shared by the kernel and its launcher.
template <int D, int DV>
struct FaGeom {
  static constexpr int DP = (D + 15) / 16 * 16;  // reduction width of Q K^T, padded to 16
  static constexpr bool SPLIT = DV < D;          // output columns split over blockIdx.z
  static constexpr int DVP = SPLIT ? DV : DP;    // output columns per block, padded to 16
  static constexpr int VW = SPLIT ? DV : D;      // real V columns loaded per block
  static constexpr int SQ = DP + 8;              // shared row strides in elements: +16 bytes
  static constexpr int SV = DVP + 8;             // keep ldmatrix free of bank conflicts
};

// Loads `valid_rows` (clamped to ROWS) rows of COLS elements; the other rows are zero-filled.
template <int ROWS, int COLS, int STRIDE, int NT>
FA_DEV void fa_load_tile(fa_u16* dst, const fa_u16* src, long long row_stride, int valid_rows, int tid) {
  constexpr int CPR = COLS / 8;  // 16-byte chunks per row
  for (int c = tid; c < ROWS * CPR; c += NT) {
    const int r = c / CPR;
    const int col = (c % CPR) * 8;
    const bool ok = r < valid_rows;
    fa_cp_async16(dst + r * STRIDE + col, ok ? src + r * row_stride + col : src, ok);
  }
}

template <typename T, int D, int DV, int WARPS, int BC>
FA_DEV void fa_fwd(const fa_u16* __restrict__ q, const fa_u16* __restrict__ k,
                   const fa_u16* __restrict__ v, fa_u16* __restrict__ o, int seq_q, int seq_k,
                   int heads, long long q_sb, long long q_sh, long long q_ss, long long k_sb,
                   long long k_sh, long long k_ss, long long v_sb, long long v_sh, long long v_ss,
                   float scale_log2, int causal) {
  typedef FaGeom<D, DV> G;
  constexpr int DP = G::DP, DVP = G::DVP, VW = G::VW, SQ = G::SQ, SV = G::SV;
  constexpr int BR = 16 * WARPS;
  constexpr int NT = 32 * WARPS;
  static_assert(D % 8 == 0, "head_dim must be a multiple of 8");
  static_assert(!G::SPLIT || (D % DV == 0 && DV % 16 == 0), "DV must divide D");
  static_assert(BC % 16 == 0, "BC must be a multiple of 16");

  FA_DYNAMIC_SMEM(smem);
  fa_u16* sQ = smem;                  // [BR][SQ]
  fa_u16* sK = sQ + BR * SQ;          // [2][BC][SQ]
  fa_u16* sV = sK + 2 * BC * SQ;      // [2][BC][SV]

  const int tid = FA_THREAD_IDX;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int row0 = FA_BLOCK_IDX_X * BR;
  const int bh = FA_BLOCK_IDX_Y;
  const int b = bh / heads;
  const int h = bh % heads;
  const int dv0 = G::SPLIT ? FA_BLOCK_IDX_Z * DV : 0;
  const fa_u16* qb = q + b * q_sb + h * q_sh;
  const fa_u16* kb = k + b * k_sb + h * k_sh;
  const fa_u16* vb = v + b * v_sb + h * v_sh + dv0;

  // Padding columns are never written by the loads: zero them once.
  if constexpr (DP > D) {
    for (int i = tid; i < (BR + 2 * BC) * (DP - D); i += NT) {
      sQ[(i / (DP - D)) * SQ + D + i % (DP - D)] = 0;  // sK follows sQ with the same stride
    }
  }
  if constexpr (DVP > VW) {
    for (int i = tid; i < 2 * BC * (DVP - VW); i += NT) {
      sV[(i / (DVP - VW)) * SV + VW + i % (DVP - VW)] = 0;
    }
  }

  // Keys this block can see: all of them, or (causal) those up to its last query row.
  const int kv_end = causal ? (seq_k < row0 + BR ? seq_k : row0 + BR) : seq_k;
  const int n_tiles = (kv_end + BC - 1) / BC;

  fa_load_tile<BR, D, SQ, NT>(sQ, qb + row0 * q_ss, q_ss, seq_q - row0, tid);
  if (n_tiles > 0) {
    fa_load_tile<BC, D, SQ, NT>(sK, kb, k_ss, seq_k, tid);
    fa_load_tile<BC, VW, SV, NT>(sV, vb, v_ss, seq_k, tid);
  }
  fa_cp_async_commit();

  const float neg_inf = fa_neg_inf();
  float acc[DVP / 8][4];
#pragma unroll
  for (int n = 0; n < DVP / 8; ++n) {
    acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  }
  float row_max[2] = {neg_inf, neg_inf};
  float row_sum[2] = {0.f, 0.f};  // this lane's partial sums; reduced over the quad at the end
  const int g = lane >> 2;        // accumulator row within the warp's 16 (and g + 8)
  const int c2 = (lane & 3) * 2;  // accumulator column pair within an 8-wide tile
  const int qrow[2] = {row0 + warp * 16 + g, row0 + warp * 16 + g + 8};

  for (int j = 0; j < n_tiles; ++j) {
    const int buf = j & 1;
    if (j + 1 < n_tiles) {
      const int k0 = (j + 1) * BC;
      fa_load_tile<BC, D, SQ, NT>(sK + (buf ^ 1) * BC * SQ, kb + k0 * k_ss, k_ss, seq_k - k0, tid);
      fa_load_tile<BC, VW, SV, NT>(sV + (buf ^ 1) * BC * SV, vb + k0 * v_ss, v_ss, seq_k - k0, tid);
      fa_cp_async_commit();
      fa_cp_async_wait<1>();
    } else {
      fa_cp_async_wait<0>();
    }
    fa_syncthreads();
    const fa_u16* cK = sK + buf * BC * SQ;
    const fa_u16* cV = sV + buf * BC * SV;

    // S = Q K^T for this warp's 16 rows and the tile's BC keys.
    float s[BC / 8][4];
#pragma unroll
    for (int n = 0; n < BC / 8; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      fa_u32 a[4];
      fa_ldmatrix_x4(a, sQ + (warp * 16 + (lane & 15)) * SQ + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < BC / 16; ++np) {
        fa_u32 bk[4];
        fa_ldmatrix_x4(bk, cK + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * SQ + kk * 16 +
                               ((lane >> 3) & 1) * 8);
        fa_mma(T(), s[2 * np], a, bk[0], bk[1]);
        fa_mma(T(), s[2 * np + 1], a, bk[2], bk[3]);
      }
    }

    // Online softmax in base 2: scale, mask, new running max, rescale what came before.
    const int kbase = j * BC;
    float mx[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = kbase + n * 8 + c2 + (e & 1);
        float x = s[n][e] * scale_log2;
        if (key >= seq_k || (causal && key > qrow[e >> 1])) x = neg_inf;
        s[n][e] = x;
        mx[e >> 1] = fa_max(mx[e >> 1], x);
      }
    }
    float base[2], alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fa_max(mx[i], fa_shfl_xor(mx[i], 1));
      mx[i] = fa_max(mx[i], fa_shfl_xor(mx[i], 2));
      base[i] = mx[i] == neg_inf ? 0.f : mx[i];  // a row with every key masked so far
      alpha[i] = fa_exp2(row_max[i] - base[i]);
      row_max[i] = mx[i];
    }
    float tile_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = fa_exp2(s[n][e] - base[e >> 1]);
        s[n][e] = p;
        tile_sum[e >> 1] += p;
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) row_sum[i] = row_sum[i] * alpha[i] + tile_sum[i];
#pragma unroll
    for (int n = 0; n < DVP / 8; ++n) {
      acc[n][0] *= alpha[0];
      acc[n][1] *= alpha[0];
      acc[n][2] *= alpha[1];
      acc[n][3] *= alpha[1];
    }

    // O += P V: the S accumulators of two adjacent 8-key tiles are the A fragment of 16 keys.
#pragma unroll
    for (int kc = 0; kc < BC / 16; ++kc) {
      fa_u32 a[4];
      a[0] = fa_pack(T(), s[2 * kc][0], s[2 * kc][1]);
      a[1] = fa_pack(T(), s[2 * kc][2], s[2 * kc][3]);
      a[2] = fa_pack(T(), s[2 * kc + 1][0], s[2 * kc + 1][1]);
      a[3] = fa_pack(T(), s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
      for (int dp = 0; dp < DVP / 16; ++dp) {
        fa_u32 bv[4];
        fa_ldmatrix_x4_trans(bv, cV + (kc * 16 + (lane & 7) + (((lane >> 3) & 1) << 3)) * SV +
                                     dp * 16 + (lane >> 4) * 8);
        fa_mma(T(), acc[2 * dp], a, bv[0], bv[1]);
        fa_mma(T(), acc[2 * dp + 1], a, bv[2], bv[3]);
      }
    }
    fa_syncthreads();  // everyone is done with `buf` before the next prefetch overwrites it
  }

  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = row_sum[i];
    l += fa_shfl_xor(l, 1);
    l += fa_shfl_xor(l, 2);
    inv[i] = l > 0.f ? 1.f / l : 0.f;
  }
  fa_u16* ob = o + (long long)bh * seq_q * D;
#pragma unroll
  for (int n = 0; n < DVP / 8; ++n) {
    const int col = dv0 + n * 8 + c2;
    if (col < D) {
      if (qrow[0] < seq_q)
        *(fa_u32*)(ob + (long long)qrow[0] * D + col) =
            fa_pack(T(), acc[n][0] * inv[0], acc[n][1] * inv[0]);
      if (qrow[1] < seq_q)
        *(fa_u32*)(ob + (long long)qrow[1] * D + col) =
            fa_pack(T(), acc[n][2] * inv[1], acc[n][3] * inv[1]);
    }
  }
}

#ifndef FA_KERNEL  // the host emulator defines its own, which also registers each kernel
#define FA_KERNEL(NAME, T, D, DV, WARPS, BC)                                                      \
  FA_KERNEL_ATTR(32 * WARPS)                                                                      \
  NAME(const fa_u16* q, const fa_u16* k, const fa_u16* v, fa_u16* o, int seq_q, int seq_k,        \
       int heads, long long q_sb, long long q_sh, long long q_ss, long long k_sb, long long k_sh,  \
       long long k_ss, long long v_sb, long long v_sh, long long v_ss, float scale_log2,          \
       int causal) {                                                                              \
    fa_fwd<T, D, DV, WARPS, BC>(q, k, v, o, seq_q, seq_k, heads, q_sb, q_sh, q_ss, k_sb, k_sh,    \
                                k_ss, v_sb, v_sh, v_ss, scale_log2, causal);                      \
  }
#endif

// The kernels: name, element type, head_dim D, output columns per block DV, warps, key tile BC.
// sd-core's Rust launcher (cuda.rs, KERNELS) holds the same table; a unit test checks they agree.
// Shared memory stays under 99 KiB per block (the opt-in limit of sm_86/sm_89; sm_80 allows 163,
// sm_90 227). Define SD_FA_ONLY_F16 or SD_FA_ONLY_BF16 to compile one element type.
#ifndef SD_FA_ONLY_BF16
FA_KERNEL(sd_flash_attn_f16_d40, FaF16, 40, 40, 4, 64)
FA_KERNEL(sd_flash_attn_f16_d64, FaF16, 64, 64, 4, 64)
FA_KERNEL(sd_flash_attn_f16_d80, FaF16, 80, 80, 4, 64)
FA_KERNEL(sd_flash_attn_f16_d128, FaF16, 128, 128, 4, 64)
FA_KERNEL(sd_flash_attn_f16_d160, FaF16, 160, 160, 4, 32)
FA_KERNEL(sd_flash_attn_f16_d512, FaF16, 512, 128, 2, 16)
#endif
#ifndef SD_FA_ONLY_F16
FA_KERNEL(sd_flash_attn_bf16_d40, FaBf16, 40, 40, 4, 64)
FA_KERNEL(sd_flash_attn_bf16_d64, FaBf16, 64, 64, 4, 64)
FA_KERNEL(sd_flash_attn_bf16_d80, FaBf16, 80, 80, 4, 64)
FA_KERNEL(sd_flash_attn_bf16_d128, FaBf16, 128, 128, 4, 64)
FA_KERNEL(sd_flash_attn_bf16_d160, FaBf16, 160, 160, 4, 32)
FA_KERNEL(sd_flash_attn_bf16_d512, FaBf16, 512, 128, 2, 16)
#endif
