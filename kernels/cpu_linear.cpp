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
// x . codes over one block of 32: the codes as four groups of eight 32-bit ints, in channel order
inline __m256 block_dot(__m256i c0, __m256i c1, __m256i c2, __m256i c3, const float* xb) {
  __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(c0), _mm256_loadu_ps(xb));
  s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c1), _mm256_loadu_ps(xb + 8), s);
  s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c2), _mm256_loadu_ps(xb + 16), s);
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(c3), _mm256_loadu_ps(xb + 24), s);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
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
    for (int64_t n = n0; n < n1; n++) {
      const uint8_t* q = Q + n * (K / 2);
      const int16_t* dn = D + n * KB;
      const int16_t* mn = Mn + n * KB;
      for (int64_t i = 0; i < M; i++) {
        const float* xi = X + i * K;
        const float* si = S.data() + i * KB;
        float total = 0.f, mins = 0.f;
#ifdef AGACC_AVX2
        const __m128i low4 = _mm_set1_epi8(0x0F);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t b = 0; b < KB; b++) {
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 16));
          const __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
          const __m256 s = block_dot(_mm256_cvtepu8_epi32(lo), _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)),
                                     _mm256_cvtepu8_epi32(hi), _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), xi + b * 32);
          acc = _mm256_fmadd_ps(s, _mm256_set1_ps(_cvtsh_ss(static_cast<uint16_t>(dn[b]))), acc);
          mins += _cvtsh_ss(static_cast<uint16_t>(mn[b])) * si[b];
        }
        total = hsum(acc);
#else
        for (int64_t b = 0; b < KB; b++) {
          const uint8_t* qb = q + b * 16;
          const float* xb = xi + b * 32;
          float s = 0.f;
          for (int j = 0; j < 16; j++) s += float(qb[j] & 0x0F) * xb[j] + float(qb[j] >> 4) * xb[j + 16];
          total += s * half_to_float(dn[b]);
          mins += half_to_float(mn[b]) * si[b];
        }
#endif
        O[i * N + n] = total + mins;
      }
    }
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
    for (int64_t n = n0; n < n1; n++) {
      const int8_t* q = Q + n * K;
      const int16_t* dn = D + n * KB;
      for (int64_t i = 0; i < M; i++) {
        const float* xi = X + i * K;
        float total = 0.f;
#ifdef AGACC_AVX2
        __m256 acc = _mm256_setzero_ps();
        for (int64_t b = 0; b < KB; b++) {
          const __m128i v0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 32));
          const __m128i v1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 32 + 16));
          const __m256 s = block_dot(_mm256_cvtepi8_epi32(v0), _mm256_cvtepi8_epi32(_mm_srli_si128(v0, 8)),
                                     _mm256_cvtepi8_epi32(v1), _mm256_cvtepi8_epi32(_mm_srli_si128(v1, 8)), xi + b * 32);
          acc = _mm256_fmadd_ps(s, _mm256_set1_ps(_cvtsh_ss(static_cast<uint16_t>(dn[b]))), acc);
        }
        total = hsum(acc);
#else
        for (int64_t b = 0; b < KB; b++) {
          float s = 0.f;
          for (int j = 0; j < 32; j++) s += float(q[b * 32 + j]) * xi[b * 32 + j];
          total += s * half_to_float(dn[b]);
        }
#endif
        O[i * N + n] = total;
      }
    }
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
      const __m128i low4 = _mm_set1_epi8(0x0F);
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb));
      const __m128i nib[4] = {_mm_and_si128(v, low4), _mm_srli_si128(_mm_and_si128(v, low4), 8),
                              _mm_and_si128(_mm_srli_epi16(v, 4), low4), _mm_srli_si128(_mm_and_si128(_mm_srli_epi16(v, 4), low4), 8)};
      const __m256 dv = _mm256_set1_ps(db), mv = _mm256_set1_ps(mb);
      for (int p = 0; p < 4; p++)
        _mm256_storeu_ps(wb + 8 * p, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(nib[p])), dv), mv));
      continue;
#endif
      for (int j = 0; j < 16; j++) {
        const float lo = float(qb[j] & 0x0F) * db, hi = float(qb[j] >> 4) * db;
        wb[j] = lo + mb;
        wb[j + 16] = hi + mb;
      }
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
