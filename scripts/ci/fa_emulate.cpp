// Runs every kernel of sd-core/src/attention/kernels/flash_attn.cu on the CPU through the host
// emulator (fa_emulator.h) and compares it with a double-precision reference computed from the
// same 16-bit inputs. Exit code 1 when any error is above tolerance.
//
//   g++ -std=c++20 -O2 -pthread -I scripts/ci -o fa_emulate scripts/ci/fa_emulate.cpp && ./fa_emulate
#define FA_HOST_EMULATION

#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

typedef void (*FaFn)(const unsigned short*, const unsigned short*, const unsigned short*,
                     unsigned short*, int, int, int, long long, long long, long long, long long,
                     long long, long long, long long, long long, long long, float, int);

struct FaReg {
  const char* name;
  FaFn fn;
  bool bf16;
  int d, dv, warps, bc, sq, sv;
  bool split;
};

static std::vector<FaReg>& fa_registry() {
  static std::vector<FaReg> r;
  return r;
}
static bool fa_register(FaReg r) {
  fa_registry().push_back(r);
  return true;
}

#define FA_KERNEL(NAME, T, D, DV, WARPS, BC)                                                     \
  extern "C" void NAME(const fa_u16* q, const fa_u16* k, const fa_u16* v, fa_u16* o, int seq_q,  \
                       int seq_k, int heads, long long q_sb, long long q_sh, long long q_ss,     \
                       long long k_sb, long long k_sh, long long k_ss, long long v_sb,           \
                       long long v_sh, long long v_ss, float scale_log2, int causal) {           \
    fa_fwd<T, D, DV, WARPS, BC>(q, k, v, o, seq_q, seq_k, heads, q_sb, q_sh, q_ss, k_sb, k_sh,   \
                                k_ss, v_sb, v_sh, v_ss, scale_log2, causal);                     \
  }                                                                                              \
  static bool fa_reg_##NAME = fa_register({#NAME, &NAME, std::is_same<T, FaBf16>::value, D, DV,  \
                                           WARPS, BC, FaGeom<D, DV>::SQ, FaGeom<D, DV>::SV,      \
                                           FaGeom<D, DV>::SPLIT});

#include "../../sd-core/src/attention/kernels/flash_attn.cu"

struct Case {
  int b, h, sq, sk;
  bool causal;
  bool strided;  // q, k, v laid out as [b, seq, h, d] (the transpose SD's attention makes)
  float std;     // input scale; large values check that the scores are computed in f32
};

static float to_f32(bool bf16, fa_u16 x) { return bf16 ? fa_emu_bf16_to_f32(x) : fa_emu_f16_to_f32(x); }
static fa_u16 from_f32(bool bf16, float x) { return bf16 ? fa_emu_f32_to_bf16(x) : fa_emu_f32_to_f16(x); }

// Returns the max abs error normalised by max(1, max |ref|); -1 on NaN.
static double run_case(const FaReg& k, const Case& c, std::mt19937& rng) {
  const int d = k.d;
  std::normal_distribution<float> normal(0.f, c.std);
  auto make = [&](int seq, long long& sb, long long& sh, long long& ss) {
    std::vector<fa_u16> t((size_t)c.b * c.h * seq * d);
    for (auto& x : t) x = from_f32(k.bf16, normal(rng));
    if (c.strided) {
      sb = (long long)seq * c.h * d, sh = d, ss = (long long)c.h * d;
    } else {
      sb = (long long)c.h * seq * d, sh = (long long)seq * d, ss = d;
    }
    return t;
  };
  long long q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss;
  auto q = make(c.sq, q_sb, q_sh, q_ss);
  auto kk = make(c.sk, k_sb, k_sh, k_ss);
  auto v = make(c.sk, v_sb, v_sh, v_ss);
  std::vector<fa_u16> o((size_t)c.b * c.h * c.sq * d, 0x7fff);
  const double scale = 1.0 / std::sqrt((double)d);
  const int br = 16 * k.warps;
  const int gx = (c.sq + br - 1) / br, gz = k.split ? d / k.dv : 1;
  const size_t smem = 2 * ((size_t)br * k.sq + 2 * k.bc * k.sq + 2 * k.bc * k.sv);
  fa_emu_launch(k.fn, gx, c.b * c.h, gz, 32 * k.warps, smem, (const fa_u16*)q.data(),
                (const fa_u16*)kk.data(), (const fa_u16*)v.data(), o.data(), c.sq, c.sk, c.h, q_sb,
                q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, (float)(scale * 1.4426950408889634),
                (int)c.causal);

  double max_err = 0, max_ref = 0;
  std::vector<double> p(c.sk);
  for (int bi = 0; bi < c.b; ++bi)
    for (int hi = 0; hi < c.h; ++hi)
      for (int i = 0; i < c.sq; ++i) {
        const fa_u16* qi = q.data() + bi * q_sb + hi * q_sh + i * q_ss;
        double mx = -INFINITY;
        for (int j = 0; j < c.sk; ++j) {
          const fa_u16* kj = kk.data() + bi * k_sb + hi * k_sh + j * k_ss;
          double s = 0;
          for (int x = 0; x < d; ++x) s += (double)to_f32(k.bf16, qi[x]) * to_f32(k.bf16, kj[x]);
          p[j] = (c.causal && j > i) ? -INFINITY : s * scale;
          if (p[j] > mx) mx = p[j];
        }
        double sum = 0;
        for (int j = 0; j < c.sk; ++j) sum += (p[j] = std::exp(p[j] - mx));
        for (int x = 0; x < d; ++x) {
          double r = 0;
          for (int j = 0; j < c.sk; ++j)
            r += p[j] * to_f32(k.bf16, v[bi * v_sb + hi * v_sh + j * v_ss + x]);
          r /= sum;
          const double got = to_f32(k.bf16, o[(((size_t)bi * c.h + hi) * c.sq + i) * d + x]);
          if (std::isnan(got)) return -1;
          max_err = std::max(max_err, std::abs(got - r));
          max_ref = std::max(max_ref, std::abs(r));
        }
      }
  return max_err / std::max(1.0, max_ref);
}

int main(int argc, char** argv) {
  // Optional argument: run only kernels whose name contains it.
  const std::string only = argc > 1 ? argv[1] : "";
  std::mt19937 rng(1234);
  int failures = 0, runs = 0;
  for (const FaReg& k : fa_registry()) {
    if (!only.empty() && std::string(k.name).find(only) == std::string::npos) continue;
    const int br = 16 * k.warps;
    std::vector<Case> cases = {
        // Several query and key tiles with ragged ends, contiguous and strided.
        {1, 2, 2 * br + 3, 2 * k.bc + 5, false, false, 1.f},
        {2, 1, br - 5, k.bc + 9, false, true, 1.f},
        // Causal (CLIP): square, and more queries than keys.
        {1, 2, br + 13, br + 13, true, false, 1.f},
        {1, 1, 2 * br + 1, k.bc + 3, true, true, 1.f},
        // One query row, one key.
        {1, 1, 1, 1, false, false, 1.f},
        // Large inputs: half-precision scores would overflow (|q.k| up to ~1e5).
        {1, 1, 37, 29, false, false, 24.f},
    };
    if (k.d == 512) cases.resize(3);  // the widest kernel is the slowest to emulate
    for (size_t ci = 0; ci < cases.size() * 2; ++ci) {
      const Case& c = cases[ci / 2];
      // Every case twice: late cp.async copies with round-robin threads, and early copies with
      // greedy scheduling (warp 0 runs ahead), which catches a tile overwritten while in use.
      fa_emu_eager_copies = fa_emu_greedy = ci % 2;
      const auto t0 = std::chrono::steady_clock::now();
      const double err = run_case(k, c, rng);
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      // Output rounding plus P rounded to 16 bits before P V.
      const double tol = k.bf16 ? 2e-2 : 3e-3;
      const bool ok = err >= 0 && err <= tol;
      failures += !ok;
      ++runs;
      std::printf("%s %-24s b=%d h=%d seq_q=%-4d seq_k=%-4d causal=%d strided=%d std=%-4g copies=%s err %.2e (tol %.0e) %.1fs\n",
                  ok ? "ok  " : "FAIL", k.name, c.b, c.h, c.sq, c.sk, c.causal, c.strided, c.std,
                  fa_emu_eager_copies ? "early" : "late ", err, tol, secs);
      std::fflush(stdout);
    }
  }
  std::printf("%d passed, %d failed\n", runs - failures, failures);
  return failures ? 1 : 0;
}
