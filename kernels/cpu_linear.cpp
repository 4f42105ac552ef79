// Linear layers on the GGUF's own block-quantised weights (CPU), for the decode step's few rows.
//
// Q4_1 (llama.cpp's block_q4_1, 32 weights a block): w[j] = q[j] * d + m, q in 0..15, d and m float16.
//   qs [N, K/2] uint8: per block 16 bytes, byte j = q[j] | q[j + 16] << 4 (the file's own order)
//   d, m [N, K/32] float16 bits (int16)
// Q8_0 (block_q8_0): w[j] = q[j] * d, q int8, d float16.
//   qs [N, K] int8, d [N, K/32] float16 bits (int16)
//
// *_mm(x [M, K] fp32, ...) -> x @ W^T [M, N] fp32: per block the dot product of the codes with x in
// fp32, times d, plus m times the block's sum of x (Q4_1). The weight bytes are read once per row of
// x; it is meant for small M (decode), where reading 4.5 (or 8.5) bits a weight instead of 32 is the
// whole cost. *_dequant -> W [N, K] fp32 exactly as gguf-py dequantises (q * d, then + m, no fused
// multiply-add), for the prefill's large M and for tests; into ``out`` when given. The PyTorch reference is
// kernels/packed_linear.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define AGACC_AVX2 1
#endif

namespace {

inline float half_to_float(int16_t h) {
  return c10::detail::fp16_ieee_to_fp32_value(static_cast<uint16_t>(h));
}

#ifdef AGACC_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One block's 32 codes as four groups of eight 32-bit ints: weights 0-7, 8-15, 16-23, 24-31. Each
// group widens 8 bytes straight from memory (no shuffle of a 16-byte load).
struct Q4_1Codes {  // bytes 0-7: weights 0-7 (low nibbles) and 16-23 (high); bytes 8-15: 8-15 and 24-31
  static constexpr int64_t bytes = 16;
  static inline void load(const uint8_t* qb, __m256i c[4]) {
    const __m256i low4 = _mm256_set1_epi32(0x0F);
    const __m256i w0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb)));
    const __m256i w1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb + 8)));
    c[0] = _mm256_and_si256(w0, low4);
    c[1] = _mm256_and_si256(w1, low4);
    c[2] = _mm256_srli_epi32(w0, 4);
    c[3] = _mm256_srli_epi32(w1, 4);
  }
};

struct Q8_0Codes {
  static constexpr int64_t bytes = 32;
  static inline void load(const uint8_t* qb, __m256i c[4]) {
    for (int k = 0; k < 4; k++)
      c[k] = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb + 8 * k)));
  }
};

// out[r] = sum over blocks b of d[r][b] * (codes[r][b] . x_b) for R consecutive weight rows (row r's
// blocks at q + r * row_bytes, its scales at d + r * KB): x's loads are shared by the R rows, and each
// block's product is two independent chains, so the loop is bound by the unpacking, not by latency.
template <int R, class Codes>
inline void scaled_dots(const uint8_t* q, int64_t row_bytes, const int16_t* d, int64_t KB, const float* x, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < KB; b++) {
    const float* xb = x + b * 32;
    const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
    const __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
    for (int r = 0; r < R; r++) {
      __m256i c[4];
      Codes::load(q + r * row_bytes + b * Codes::bytes, c);
      __m256 s0 = _mm256_mul_ps(_mm256_cvtepi32_ps(c[0]), x0);
      __m256 s1 = _mm256_mul_ps(_mm256_cvtepi32_ps(c[1]), x1);
      s0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[2]), x2, s0);
      s1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[3]), x3, s1);
      const __m256 scale = _mm256_set1_ps(_cvtsh_ss(static_cast<uint16_t>(d[r * KB + b])));
      acc[r] = _mm256_fmadd_ps(_mm256_add_ps(s0, s1), scale, acc[r]);
    }
  }
  for (int r = 0; r < R; r++) out[r] = hsum(acc[r]);
}

// sum over blocks b of m[b] * s[b] (float16 bits m, fp32 s)
inline float half_dot(const int16_t* m, const float* s, int64_t KB) {
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= KB; b += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + b))),
                          _mm256_loadu_ps(s + b), acc);
  float total = hsum(acc);
  for (; b < KB; b++) total += _cvtsh_ss(static_cast<uint16_t>(m[b])) * s[b];
  return total;
}

// O[i, n] = x_i . W_n over rows [n0, n1) of W, two rows at a time
template <class Codes>
void small_mm(const uint8_t* Q, const int16_t* D, const float* X, float* O, int64_t M, int64_t K, int64_t N,
              int64_t n0, int64_t n1) {
  const int64_t KB = K / 32, row_bytes = KB * Codes::bytes;
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2)
    for (int64_t i = 0; i < M; i++) {
      float two[2];
      scaled_dots<2, Codes>(Q + n * row_bytes, row_bytes, D + n * KB, KB, X + i * K, two);
      O[i * N + n] = two[0];
      O[i * N + n + 1] = two[1];
    }
  for (; n < n1; n++)
    for (int64_t i = 0; i < M; i++) scaled_dots<1, Codes>(Q + n * row_bytes, row_bytes, D + n * KB, KB, X + i * K, O + i * N + n);
}
#endif

void check(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d, int64_t bytes_per_block) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous CPU float32 [M, K] tensor");
  const int64_t K = x.size(1), N = qs.size(0);
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32, got ", K);
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && qs.size(1) * 32 == K * bytes_per_block,
              "codes must be [N, K * ", bytes_per_block, " / 32]");
  TORCH_CHECK(d.dim() == 2 && d.is_contiguous() && d.scalar_type() == torch::kInt16 && d.size(0) == N && d.size(1) == K / 32,
              "scales must be int16 (float16 bits) [N, K / 32]");
}

// the sums of x over every block of 32: [M, K / 32]
std::vector<float> block_sums(const float* X, int64_t M, int64_t K) {
  const int64_t KB = K / 32;
  std::vector<float> S(M * KB);
  for (int64_t i = 0; i < M; i++)
    for (int64_t b = 0; b < KB; b++) {
      float s = 0.f;
      for (int j = 0; j < 32; j++) s += X[i * K + b * 32 + j];
      S[i * KB + b] = s;
    }
  return S;
}

// the dequantised weight's storage: ``out`` when it is given (a reused buffer: a fresh allocation of a
// few MB costs more in first-touch page faults than the dequantisation itself), else a new tensor
torch::Tensor output(const torch::Tensor& out, int64_t N, int64_t K) {
  if (!out.defined() || out.numel() == 0) return torch::empty({N, K}, torch::kFloat);
  TORCH_CHECK(out.scalar_type() == torch::kFloat && out.is_contiguous() && out.numel() == N * K, "out must be fp32 [N, K]");
  return out.view({N, K});
}

}  // namespace

torch::Tensor q4_1_mm(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m) {
  check(x, qs, d, 16);
  TORCH_CHECK(m.sizes() == d.sizes() && m.scalar_type() == torch::kInt16 && m.is_contiguous(), "mins must match scales");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0), KB = K / 32;
  auto out = torch::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const uint8_t* Q = qs.data_ptr<uint8_t>();
  const int16_t* D = d.data_ptr<int16_t>();
  const int16_t* Mn = m.data_ptr<int16_t>();
  float* O = out.data_ptr<float>();
  const std::vector<float> S = block_sums(X, M, K);
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
#ifdef AGACC_AVX2
    small_mm<Q4_1Codes>(Q, D, X, O, M, K, N, n0, n1);
    for (int64_t n = n0; n < n1; n++)
      for (int64_t i = 0; i < M; i++) O[i * N + n] += half_dot(Mn + n * KB, S.data() + i * KB, KB);
#else
    for (int64_t n = n0; n < n1; n++) {
      const uint8_t* q = Q + n * (K / 2);
      const int16_t* dn = D + n * KB;
      const int16_t* mn = Mn + n * KB;
      for (int64_t i = 0; i < M; i++) {
        const float* xi = X + i * K;
        const float* si = S.data() + i * KB;
        float total = 0.f, mins = 0.f;
        for (int64_t b = 0; b < KB; b++) {
          const uint8_t* qb = q + b * 16;
          const float* xb = xi + b * 32;
          float s = 0.f;
          for (int j = 0; j < 16; j++) s += float(qb[j] & 0x0F) * xb[j] + float(qb[j] >> 4) * xb[j + 16];
          total += s * half_to_float(dn[b]);
          mins += half_to_float(mn[b]) * si[b];
        }
        O[i * N + n] = total + mins;
      }
    }
#endif
  });
  return out;
}

torch::Tensor q8_0_mm(torch::Tensor x, torch::Tensor qs, torch::Tensor d) {
  check(x, qs, d, 32);
  TORCH_CHECK(qs.scalar_type() == torch::kChar, "Q8_0 codes must be int8");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0), KB = K / 32;
  auto out = torch::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const int8_t* Q = qs.data_ptr<int8_t>();
  const int16_t* D = d.data_ptr<int16_t>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
#ifdef AGACC_AVX2
    small_mm<Q8_0Codes>(reinterpret_cast<const uint8_t*>(Q), D, X, O, M, K, N, n0, n1);
#else
    for (int64_t n = n0; n < n1; n++) {
      const int8_t* q = Q + n * K;
      const int16_t* dn = D + n * KB;
      for (int64_t i = 0; i < M; i++) {
        const float* xi = X + i * K;
        float total = 0.f;
        for (int64_t b = 0; b < KB; b++) {
          float s = 0.f;
          for (int j = 0; j < 32; j++) s += float(q[b * 32 + j]) * xi[b * 32 + j];
          total += s * half_to_float(dn[b]);
        }
        O[i * N + n] = total;
      }
    }
#endif
  });
  return out;
}

// gguf-py's rounding: (q * d) then + m, each rounded to fp32. fp-contract=off keeps the compiler
// from fusing them into one multiply-add (one rounding), which -ffast-math would allow.
__attribute__((optimize("no-fast-math", "fp-contract=off")))
torch::Tensor q4_1_dequant(torch::Tensor qs, torch::Tensor d, torch::Tensor m, torch::Tensor out) {
  const int64_t N = qs.size(0), K = qs.size(1) * 2, KB = K / 32;
  TORCH_CHECK(d.size(0) == N && d.size(1) == KB && m.sizes() == d.sizes(), "scales / mins must be [N, K / 32]");
  auto w = output(out, N, K);
  const uint8_t* Q = qs.data_ptr<uint8_t>();
  const int16_t* D = d.data_ptr<int16_t>();
  const int16_t* Mn = m.data_ptr<int16_t>();
  float* W = w.data_ptr<float>();
  at::parallel_for(0, N * KB, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
      const float db = half_to_float(D[b]), mb = half_to_float(Mn[b]);
      const uint8_t* qb = Q + b * 16;
      float* wb = W + b * 32;
#ifdef AGACC_AVX2
      __m256i c[4];
      Q4_1Codes::load(qb, c);
      const __m256 dv = _mm256_set1_ps(db), mv = _mm256_set1_ps(mb);
      for (int p = 0; p < 4; p++)
        _mm256_storeu_ps(wb + 8 * p, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(c[p]), dv), mv));
#else
      for (int j = 0; j < 16; j++) {
        const float lo = float(qb[j] & 0x0F) * db, hi = float(qb[j] >> 4) * db;
        wb[j] = lo + mb;
        wb[j + 16] = hi + mb;
      }
#endif
    }
  });
  return w;
}

torch::Tensor q8_0_dequant(torch::Tensor qs, torch::Tensor d, torch::Tensor out) {
  const int64_t N = qs.size(0), K = qs.size(1), KB = K / 32;
  TORCH_CHECK(d.size(0) == N && d.size(1) == KB, "scales must be [N, K / 32]");
  auto w = output(out, N, K);
  const int8_t* Q = qs.data_ptr<int8_t>();
  const int16_t* D = d.data_ptr<int16_t>();
  float* W = w.data_ptr<float>();
  at::parallel_for(0, N * KB, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
      const float db = half_to_float(D[b]);
      for (int j = 0; j < 32; j++) W[b * 32 + j] = float(Q[b * 32 + j]) * db;
    }
  });
  return w;
}
