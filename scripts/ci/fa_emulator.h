// Host emulation of the handful of CUDA/PTX features that sd-core's flash-attention kernels use,
// so that the very same kernel source (sd-core/src/attention/kernels/flash_attn.cu, compiled with
// -DFA_HOST_EMULATION) runs on a CPU. Each CUDA thread of a block is a cooperatively scheduled
// fiber (ucontext) that runs until it waits at a barrier (round robin or greedy scheduling,
// fa_emu_greedy): bar.sync, or one of the
// warp-synchronous instructions (ldmatrix, mma.sync, shfl.sync), which exchange their operands
// through per-warp buffers and compute the fragment layouts exactly as the PTX ISA specifies
// them. A missing __syncthreads shows as wrong data: with greedy scheduling warp 0 runs ahead.
// cp.async copies land either when issued or only when cp.async.wait_group releases their group
// (fa_emu_eager_copies), so a kernel that overwrites a tile still in use, or reads one before
// waiting for it, gets wrong data here too. Shared memory starts filled with NaNs.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <vector>

#define FA_DEV static inline
#define FA_KERNEL_ATTR(threads) extern "C" void
#define __restrict__ __restrict

struct FaEmuCopy {
  void* dst;
  const void* src;
  bool valid;
};

// One emulated CUDA thread.
struct FaEmuFiber {
  ucontext_t ctx;
  std::vector<char> stack;
  int tid = 0;
  bool done = false;
  const unsigned* wait_on = nullptr;  // the barrier generation this fiber waits to change
  unsigned wait_gen = 0;
  bool runnable() const { return !done && (wait_on == nullptr || *wait_on != wait_gen); }
  std::vector<FaEmuCopy> open_group;  // cp.async issued since the last commit
  std::deque<std::vector<FaEmuCopy>> groups;
};

inline ucontext_t fa_emu_sched_ctx;
inline FaEmuFiber* fa_emu_cur;
inline int fa_emu_bx, fa_emu_by, fa_emu_bz;

inline void fa_emu_yield() { swapcontext(&fa_emu_cur->ctx, &fa_emu_sched_ctx); }

struct FaEmuBarrier {
  int n, count = 0;
  unsigned gen = 0;
  explicit FaEmuBarrier(int n_) : n(n_) {}
  void arrive_and_wait() {
    if (++count == n) {
      count = 0;
      ++gen;
      return;
    }
    fa_emu_cur->wait_on = &gen;  // not runnable until the generation moves on
    fa_emu_cur->wait_gen = gen;
    fa_emu_yield();
  }
};

struct FaEmuWarp {
  FaEmuBarrier bar{32};
  const void* addr[32];
  fa_u32 regs[32][6];
  float f[32];
};

struct FaEmuBlock {
  FaEmuBarrier bar;
  std::vector<fa_u16> smem;
  std::vector<FaEmuWarp> warps;
  FaEmuBlock(int threads, size_t smem_bytes)
      : bar(threads), smem(smem_bytes / 2, 0x7fff), warps(threads / 32) {}
};

inline FaEmuBlock* fa_emu_block;

#define FA_THREAD_IDX (fa_emu_cur->tid)
#define FA_BLOCK_IDX_X fa_emu_bx
#define FA_BLOCK_IDX_Y fa_emu_by
#define FA_BLOCK_IDX_Z fa_emu_bz
#define FA_DYNAMIC_SMEM(name) fa_u16* name = fa_emu_block->smem.data()

inline FaEmuWarp& fa_emu_warp() { return fa_emu_block->warps[fa_emu_cur->tid / 32]; }

// 16-bit float formats <-> f32.
inline float fa_emu_f16_to_f32(fa_u16 h) {
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return (float)x;
}
inline fa_u16 fa_emu_f32_to_f16(float f) {
  _Float16 x = (_Float16)f;  // round to nearest even
  fa_u16 h;
  std::memcpy(&h, &x, 2);
  return h;
}
inline float fa_emu_bf16_to_f32(fa_u16 h) {
  fa_u32 u = (fa_u32)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline fa_u16 fa_emu_f32_to_bf16(float f) {
  fa_u32 u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  u += 0x7fff + ((u >> 16) & 1);  // round to nearest even
  return (fa_u16)(u >> 16);
}
inline float fa_emu_to_f32(FaF16, fa_u16 h) { return fa_emu_f16_to_f32(h); }
inline float fa_emu_to_f32(FaBf16, fa_u16 h) { return fa_emu_bf16_to_f32(h); }
inline fa_u16 fa_emu_from_f32(FaF16, float f) { return fa_emu_f32_to_f16(f); }
inline fa_u16 fa_emu_from_f32(FaBf16, float f) { return fa_emu_f32_to_bf16(f); }

FA_DEV void fa_emu_ldmatrix(fa_u32 (&r)[4], const fa_u16* p, bool trans) {
  FaEmuWarp& w = fa_emu_warp();
  const int lane = fa_emu_cur->tid % 32;
  w.addr[lane] = p;
  w.bar.arrive_and_wait();
  for (int m = 0; m < 4; ++m) {
    const fa_u16* const* rows = (const fa_u16* const*)&w.addr[8 * m];
    fa_u16 lo, hi;
    if (!trans) {  // (row lane/4, columns 2(lane%4), +1)
      lo = rows[lane / 4][2 * (lane % 4)];
      hi = rows[lane / 4][2 * (lane % 4) + 1];
    } else {  // the same positions of the transposed matrix
      lo = rows[2 * (lane % 4)][lane / 4];
      hi = rows[2 * (lane % 4) + 1][lane / 4];
    }
    r[m] = (fa_u32)lo | ((fa_u32)hi << 16);
  }
  w.bar.arrive_and_wait();
}

FA_DEV void fa_ldmatrix_x4(fa_u32 (&r)[4], const fa_u16* p) { fa_emu_ldmatrix(r, p, false); }
FA_DEV void fa_ldmatrix_x4_trans(fa_u32 (&r)[4], const fa_u16* p) { fa_emu_ldmatrix(r, p, true); }

// mma.sync.m16n8k16.row.col with f32 accumulators. Fragment layouts (PTX ISA, "Matrix
// Fragments for mma.m16n8k16"), with g = lane / 4 and t = lane % 4:
//   A (16x16): a0,a1 (row g, cols 2t,2t+1), a2,a3 (row g+8), a4,a5 (row g, cols 2t+8,+9), a6,a7 (row g+8, cols 2t+8,+9)
//   B (16x8):  b0,b1 (rows 2t,2t+1, col g), b2,b3 (rows 2t+8,+9, col g)
//   C/D:       c0,c1 (row g, cols 2t,2t+1), c2,c3 (row g+8, cols 2t,2t+1)
template <typename T>
FA_DEV void fa_emu_mma(float (&d)[4], const fa_u32 (&a)[4], fa_u32 b0, fa_u32 b1) {
  FaEmuWarp& w = fa_emu_warp();
  const int lane = fa_emu_cur->tid % 32;
  for (int i = 0; i < 4; ++i) w.regs[lane][i] = a[i];
  w.regs[lane][4] = b0;
  w.regs[lane][5] = b1;
  w.bar.arrive_and_wait();
  auto A = [&](int row, int kx) {
    const int src = (row % 8) * 4 + (kx % 8) / 2;
    const int reg = (row >= 8 ? 1 : 0) + (kx >= 8 ? 2 : 0);
    return fa_emu_to_f32(T(), (fa_u16)(w.regs[src][reg] >> (16 * (kx % 2))));
  };
  auto B = [&](int kx, int col) {
    const int src = col * 4 + (kx % 8) / 2;
    const int reg = 4 + (kx >= 8 ? 1 : 0);
    return fa_emu_to_f32(T(), (fa_u16)(w.regs[src][reg] >> (16 * (kx % 2))));
  };
  const int g = lane / 4, t = lane % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + (e % 2);
    float sum = d[e];
    for (int kx = 0; kx < 16; ++kx) sum += A(row, kx) * B(kx, col);
    out[e] = sum;
  }
  w.bar.arrive_and_wait();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

FA_DEV void fa_mma(FaF16, float (&d)[4], const fa_u32 (&a)[4], fa_u32 b0, fa_u32 b1) {
  fa_emu_mma<FaF16>(d, a, b0, b1);
}
FA_DEV void fa_mma(FaBf16, float (&d)[4], const fa_u32 (&a)[4], fa_u32 b0, fa_u32 b1) {
  fa_emu_mma<FaBf16>(d, a, b0, b1);
}

FA_DEV fa_u32 fa_pack(FaF16, float lo, float hi) {
  return (fa_u32)fa_emu_f32_to_f16(lo) | ((fa_u32)fa_emu_f32_to_f16(hi) << 16);
}
FA_DEV fa_u32 fa_pack(FaBf16, float lo, float hi) {
  return (fa_u32)fa_emu_f32_to_bf16(lo) | ((fa_u32)fa_emu_f32_to_bf16(hi) << 16);
}

// Copies land at the latest possible moment (deferred: when wait_group releases them) or at the
// earliest (eager: when issued); run both to catch reading too early and overwriting too early.
inline bool fa_emu_eager_copies = false;
// Scheduling: round robin (all warps advance together) or greedy (always the lowest runnable
// thread: warp 0 runs as far ahead of the others as the barriers allow).
inline bool fa_emu_greedy = false;

FA_DEV void fa_cp_async16(fa_u16* dst, const fa_u16* src, bool valid) {
  if (fa_emu_eager_copies) {
    if (valid)
      std::memcpy(dst, src, 16);
    else
      std::memset(dst, 0, 16);
    return;
  }
  fa_emu_cur->open_group.push_back({dst, src, valid});
}
FA_DEV void fa_cp_async_commit() {
  fa_emu_cur->groups.push_back(std::move(fa_emu_cur->open_group));
  fa_emu_cur->open_group.clear();
}
template <int N>
FA_DEV void fa_cp_async_wait() {
  auto& groups = fa_emu_cur->groups;
  while ((int)groups.size() > N) {
    for (const FaEmuCopy& c : groups.front()) {
      if (c.valid)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
    }
    groups.pop_front();
  }
}

FA_DEV void fa_syncthreads() { fa_emu_block->bar.arrive_and_wait(); }

FA_DEV float fa_shfl_xor(float x, int mask) {
  FaEmuWarp& w = fa_emu_warp();
  const int lane = fa_emu_cur->tid % 32;
  w.f[lane] = x;
  w.bar.arrive_and_wait();
  const float r = w.f[lane ^ mask];
  w.bar.arrive_and_wait();
  return r;
}

FA_DEV float fa_exp2(float x) { return std::exp2(x); }
FA_DEV float fa_neg_inf() { return -INFINITY; }
FA_DEV float fa_max(float a, float b) { return a > b ? a : b; }

inline std::function<void()> fa_emu_body;

inline void fa_emu_trampoline() {
  fa_emu_body();
  fa_emu_cur->done = true;  // returns to the scheduler through uc_link
}

// Runs `kernel` over a grid, one block at a time, each CUDA thread a fiber.
template <typename Kernel, typename... Args>
void fa_emu_launch(Kernel kernel, int gx, int gy, int gz, int threads, size_t smem_bytes, Args... args) {
  static std::vector<FaEmuFiber> fibers;
  if ((int)fibers.size() < threads) fibers.resize(threads);
  fa_emu_body = [&] { kernel(args...); };
  for (int z = 0; z < gz; ++z)
    for (int y = 0; y < gy; ++y)
      for (int x = 0; x < gx; ++x) {
        FaEmuBlock block(threads, smem_bytes);
        fa_emu_block = &block;
        fa_emu_bx = x, fa_emu_by = y, fa_emu_bz = z;
        for (int t = 0; t < threads; ++t) {
          FaEmuFiber& f = fibers[t];
          f.stack.resize(1 << 18);
          f.tid = t;
          f.done = false;
          f.wait_on = nullptr;
          f.open_group.clear();
          f.groups.clear();
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &fa_emu_sched_ctx;
          makecontext(&f.ctx, fa_emu_trampoline, 0);
        }
        for (int t = 0, live = threads; live > 0;) {
          // Next runnable fiber: the lowest one (greedy) or the next after the last (round robin).
          int pick = -1;
          for (int i = 0; i < threads; ++i) {
            const int c = fa_emu_greedy ? i : (t + i) % threads;
            if (fibers[c].runnable()) {
              pick = c;
              break;
            }
          }
          if (pick < 0) {
            std::fprintf(stderr, "fa_emulator: deadlock (every thread waits at a barrier)\n");
            std::abort();
          }
          fa_emu_cur = &fibers[pick];
          fa_emu_cur->wait_on = nullptr;
          swapcontext(&fa_emu_sched_ctx, &fa_emu_cur->ctx);
          live -= fa_emu_cur->done;
          t = pick + 1;
        }
        fa_emu_block = nullptr;
      }
}
