// Fused CPU decode step of one layer: scores over every stored part (full-precision entries, packed
// quantised blocks: unpack + dequantise + dot product in one pass, with no float copy of a segment),
// one softmax, the weighted values and the attention mass per entry, in one call from Python
// (agacc/decode.py's PyTorch path is the reference). With AVX2 a packed row's codes are unpacked eight
// channels at a time into registers and meet the g query heads of their KV head there: keys two tokens
// at a time, values eight channels at a time down all of a part's tokens (their zero points' share
// summed once per group); the scalar loops serve other CPUs and query groups over 8.
//
// Layouts (agacc/store.py, agacc/quant.py):
//   packed  uint8 [BH, n, m]: one row of m = D * c / 8 bytes per token, container c in {2, 3, 4, 8};
//           code j of byte i (bit j * c) is channel i * (8 / c) + j; the 3-bit container is a 2-bit
//           plane (D / 4 bytes) followed by a 1-bit plane of the high bits (D / 8 bytes).
//   keys    per channel per block (scale/zero [BH, n / B, D]) or per token (scale/zero [BH, n, R],
//           R groups of D / R channels); values per token (scale/zero [BH, n, R]).
//   x = code * scale + zero.
//   scales and zero points are read as stored (fp16, bf16 or fp32); arithmetic is fp32.
//   keys in a basis (kernels/format.py's Part.basis; always per channel per block of B tokens): a key
//           row holds r coefficients in groups ((width, count), ...), each group packed as above with
//           count in place of D, the groups' bytes one after the other (format.pack_groups); scale/zero
//           [BH, n / B, r] per coefficient per block. The key is frame(c @ axes[head], pos, inv_freq, +1):
//           axes [H, r, D] fp32, inv_freq [D / 2] fp32, pos [n] int32; frame turns the rotate_half pairs
//           (channel i, i + D/2) by the angle pos * inv_freq[i] (format.frame). Never Hadamard-rotated.
// BH = batch x KV heads; g query heads share a KV head (GQA).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// Byte -> codes lookup tables: kLut4[b] = the 2 nibbles of b, kLut2[b] its 4 two-bit codes, kLutHi[b]
// its 8 bits times 4 (the 3-bit container's high plane), each as floats.
struct Luts {
  float lut4[256][2], lut2[256][4], hi[256][8];
  Luts() {
    for (int b = 0; b < 256; ++b) {
      for (int j = 0; j < 2; ++j) lut4[b][j] = (b >> (4 * j)) & 15;
      for (int j = 0; j < 4; ++j) lut2[b][j] = (b >> (2 * j)) & 3;
      for (int j = 0; j < 8; ++j) hi[b][j] = 4 * ((b >> j) & 1);
    }
  }
};
const Luts kLuts;

#if defined(__AVX2__)
// Codes of channels d..d+7 of a packed row (container c; D % 8 == 0) as eight floats: their packed
// fields shifted into eight lanes at once (the 3-bit container: two low-plane bytes and one high-plane
// byte, low two bits + 4 x high bit).
inline __m256 codes_at(const uint8_t* row, int c, int D, int d) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  switch (c) {
    case 8:
      return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + d))));
    case 4: {  // eight channels in c bytes: channel l at bit c * l
      uint32_t bits;
      std::memcpy(&bits, row + d / 2, 4);
      return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)bits), _mm256_slli_epi32(lane, 2)),
                                                 _mm256_set1_epi32(15)));
    }
    case 2: {
      uint16_t bits;
      std::memcpy(&bits, row + d / 4, 2);
      return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)bits), _mm256_slli_epi32(lane, 1)),
                                                 _mm256_set1_epi32(3)));
    }
    case 3: {
      uint16_t lo;
      std::memcpy(&lo, row + d / 4, 2);
      const __m256i v = _mm256_set1_epi32((int)(lo | ((uint32_t)row[D / 4 + d / 8] << 16)));
      const __m256i code = _mm256_or_si256(
          _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_slli_epi32(lane, 1)), _mm256_set1_epi32(3)),
          _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(v, _mm256_add_epi32(lane, _mm256_set1_epi32(16))),
                                             _mm256_set1_epi32(1)), 2));
      return _mm256_cvtepi32_ps(code);
    }
    default:
      TORCH_CHECK(false, "unknown container ", c);
  }
}

// unpack_row's vector form for D % 8 == 0.
inline void unpack_row_avx2(const uint8_t* row, int c, int D, float* out) {
  for (int d = 0; d < D; d += 8) _mm256_storeu_ps(out + d, codes_at(row, c, D, d));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for eight lanes (Cephes' expf: range reduction by ln 2, degree-5 polynomial; rel. error ~2e-7),
// x <= 0 here (scores minus their max); below -87 it flushes to 0.
inline __m256 exp8(__m256 x) {
  const __m256 kept = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), kept);
}
#endif

inline void unpack_row(const uint8_t* row, int c, int D, float* out) {
#if defined(__AVX2__)
  if (D % 8 == 0) return unpack_row_avx2(row, c, D, out);
#endif
  switch (c) {
    case 8:
      for (int d = 0; d < D; ++d) out[d] = row[d];
      break;
    case 4:
      for (int i = 0; i < D / 2; ++i) {
        out[2 * i] = kLuts.lut4[row[i]][0];
        out[2 * i + 1] = kLuts.lut4[row[i]][1];
      }
      break;
    case 2:
      for (int i = 0; i < D / 4; ++i)
        for (int j = 0; j < 4; ++j) out[4 * i + j] = kLuts.lut2[row[i]][j];
      break;
    case 3: {
      const uint8_t* lo = row;
      const uint8_t* hi = row + D / 4;
      for (int i = 0; i < D / 8; ++i) {  // channels 8i .. 8i+7: two low-plane bytes, one high-plane byte
        const float* a = kLuts.lut2[lo[2 * i]];
        const float* b = kLuts.lut2[lo[2 * i + 1]];
        const float* h = kLuts.hi[hi[i]];
        for (int j = 0; j < 4; ++j) {
          out[8 * i + j] = a[j] + h[j];
          out[8 * i + 4 + j] = b[j] + h[4 + j];
        }
      }
      break;
    }
    default:
      TORCH_CHECK(false, "unknown container ", c);
  }
}

// sum_d a[d] * b[d], eight lanes at a time (which the compiler vectorises), then the tail.
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  const int64_t n8 = n - n % 8;
  for (int64_t d = 0; d < n8; d += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[d + l] * b[d + l];
  float tail = 0.f;
  for (int64_t d = n8; d < n; ++d) tail += a[d] * b[d];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

void check_codes(const torch::Tensor& packed, int c, int64_t D) {
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 4, "codes: uint8 [Bt, H, n, m]");
  TORCH_CHECK(c == 2 || c == 3 || c == 4 || c == 8, "container must be 2, 3, 4 or 8");
  TORCH_CHECK(packed.size(3) * 8 == D * c, "row bytes ", packed.size(3), " do not hold ", D, " codes of ", c, " bits");
}

// ---- one decode step of one layer --------------------------------------------------------------
// A part is one stretch of entries (agacc/store.py's attention order: full, int8..int2, sparse,
// markers, hot). Dense parts hold k, v as floats of any width; quantised parts hold packed codes.

inline void load_row(const float* src, int64_t n, float* dst) { std::memcpy(dst, src, n * sizeof(float)); }

inline void load_row(const at::Half* src, int64_t n, float* dst) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)  // eight conversions per instruction (c10::Half converts one at a time in software)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void load_row(const at::BFloat16* src, int64_t n, float* dst) {  // bf16 = the top half of an fp32
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

// A float tensor's data of fp32, fp16 or bf16, read as fp32 rows.
struct FloatData {
  const void* ptr = nullptr;
  at::ScalarType type = at::kFloat;
  FloatData() = default;
  explicit FloatData(const torch::Tensor& t) : ptr(t.data_ptr()), type(t.scalar_type()) {
    TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, "float tensors must be fp32, fp16 or bf16");
  }
  void row(int64_t offset, int64_t n, float* dst) const {
    switch (type) {
      case at::kHalf: load_row(static_cast<const at::Half*>(ptr) + offset, n, dst); break;
      case at::kBFloat16: load_row(static_cast<const at::BFloat16*>(ptr) + offset, n, dst); break;
      default: load_row(static_cast<const float*>(ptr) + offset, n, dst);
    }
  }
};

struct Part {
  bool quantised = false;
  int64_t n = 0;            // entries per batch x head
  FloatData k, v;           // dense: [BH, n, D]
  const float* bias = nullptr;  // dense: [n] logit bias or null
  const uint8_t* pk = nullptr;  // quantised: packed [BH, n, m]
  const uint8_t* pv = nullptr;
  FloatData ks, kz, vs, vz;     // scales / zero points (see the layouts at the top)
  int64_t m = 0, container = 0, block = 0, rk = 0, rv = 0;
  int64_t mk = 0;               // quantised: key row bytes (m, or the basis coefficients' bytes)
  bool rotated = false;         // the codes are of K H and V H; a basis part: V H alone
  // keys in a basis (quantised, per channel per block): rank r coefficients in groups (width, count)
  int64_t rank = 0, heads = 0, ngroups = 0, gwidth[4] = {}, gcount[4] = {};
  const float* axes = nullptr;      // [heads, rank, D]
  const float* inv_freq = nullptr;  // [D / 2]
  const int32_t* pos = nullptr;     // [n]
};

#if defined(__AVX2__)
// f(std::integral_constant<int, G>) for the query-group size g = G in 1..8 (the vector paths keep G
// accumulators per token in registers); false for larger groups, which take the scalar loops.
template <class F>
bool with_group(int64_t g, F&& f) {
  switch (g) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 3: f(std::integral_constant<int, 3>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 5: f(std::integral_constant<int, 5>{}); return true;
    case 6: f(std::integral_constant<int, 6>{}); return true;
    case 7: f(std::integral_constant<int, 7>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
    default: return false;
  }
}

// Scores of T consecutive tokens from t (keys per channel: the block's scales already folded into qs
// [G, D], its zero points into bias [G]): each token's codes meet the G queries in registers.
template <int G, int T>
inline void token_scores(const Part& P, int64_t bh, int64_t t, int64_t D, const float* qs, const float* bias, float* S,
                         int64_t ld) {
  const uint8_t* row = P.pk + (bh * P.n + t) * P.mk;
  __m256 acc[T][G];
  for (int i = 0; i < T; ++i)
    for (int j = 0; j < G; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int d = 0; d < D; d += 8) {
    __m256 cv[T];
    for (int i = 0; i < T; ++i) cv[i] = codes_at(row + i * P.mk, (int)P.container, (int)D, d);
    for (int j = 0; j < G; ++j) {
      const __m256 qv = _mm256_loadu_ps(qs + j * D + d);
      for (int i = 0; i < T; ++i) acc[i][j] = _mm256_fmadd_ps(qv, cv[i], acc[i][j]);
    }
  }
  for (int i = 0; i < T; ++i)
    for (int j = 0; j < G; ++j) S[j * ld + t + i] = hsum(acc[i][j]) + bias[j];
}

// One key block's scores, two tokens at a time (2G independent sums in flight), then the odd one.
template <int G>
void block_scores(const Part& P, int64_t bh, int64_t blk, int64_t D, const float* qs, const float* bias, float* S,
                  int64_t ld) {
  int64_t t = blk * P.block;
  const int64_t end = (blk + 1) * P.block;
  for (; t + 2 <= end; t += 2) token_scores<G, 2>(P, bh, t, D, qs, bias, S, ld);
  if (t < end) token_scores<G, 1>(P, bh, t, D, qs, bias, S, ld);
}

// out_j += sum_t p_jt (s_tr codes_t + z_tr) over a quantised part's values (R groups of D / R channels):
// the zeros' share is one sum per group, sum_t p_jt z_tr; the codes' share runs eight channels at a
// time over all tokens with G accumulators in registers, the weights w_jrt = p_jt s_tr computed once.
template <int G>
void quant_values(const Part& P, int64_t bh, const float* ph, int64_t D, int64_t ld, float* oh) {
  const int64_t n = P.n, R = P.rv, gs = D / R;
  const int c = (int)P.container;
  thread_local std::vector<float> buf;
  buf.resize(2 * n * R + G * R * n);
  float* sv = buf.data();
  float* zv = sv + n * R;
  float* w = zv + n * R;
  P.vs.row(bh * n * R, n * R, sv);
  P.vz.row(bh * n * R, n * R, zv);
  float zsum[G * 8] = {};  // R <= 8: the caller takes larger R to the scalar loops
  for (int j = 0; j < G; ++j) {
    const float* p = ph + j * ld;
    for (int64_t r = 0; r < R; ++r) {
      float* wr = w + (j * R + r) * n;
      float zs = 0.f;
      for (int64_t t = 0; t < n; ++t) {
        wr[t] = p[t] * sv[t * R + r];
        zs += p[t] * zv[t * R + r];
      }
      zsum[j * R + r] = zs;
    }
  }
  const uint8_t* rows = P.pv + bh * n * P.m;
  for (int d = 0; d < D; d += 8) {
    const int64_t r = d / gs;
    __m256 acc[G];
    for (int j = 0; j < G; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const __m256 cv = codes_at(rows + t * P.m, c, (int)D, d);
      for (int j = 0; j < G; ++j) acc[j] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + (j * R + r) * n + t), cv, acc[j]);
    }
    for (int j = 0; j < G; ++j) {
      float* o = oh + j * D + d;
      _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), _mm256_add_ps(acc[j], _mm256_set1_ps(zsum[j * R + r]))));
    }
  }
}

#endif

// K [T, D] = C [T, r] @ A [r, D]: T keys rebuilt from their coefficients (rows r apart), 16 channels at
// a time with 2T accumulators in registers (each axis row loaded once for the T tokens), then 8; with
// AVX-512, 32 channels at a time first (2T 16-lane accumulators).
#if defined(__AVX2__)
template <int T>
inline void rebuild_keys(const float* C, int64_t r, const float* A, int64_t D, float* K) {
  int64_t d0 = 0;
#if defined(__AVX512F__)
  for (; d0 + 32 <= D; d0 += 32) {
    __m512 acc[T][2];
    for (int i = 0; i < T; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < r; ++k) {
      const __m512 a0 = _mm512_loadu_ps(A + k * D + d0), a1 = _mm512_loadu_ps(A + k * D + d0 + 16);
      for (int i = 0; i < T; ++i) {
        const __m512 c = _mm512_set1_ps(C[i * r + k]);
        acc[i][0] = _mm512_fmadd_ps(c, a0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(c, a1, acc[i][1]);
      }
    }
    for (int i = 0; i < T; ++i) {
      _mm512_storeu_ps(K + i * D + d0, acc[i][0]);
      _mm512_storeu_ps(K + i * D + d0 + 16, acc[i][1]);
    }
  }
#endif
  for (; d0 + 16 <= D; d0 += 16) {
    __m256 acc[T][2];
    for (int i = 0; i < T; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < r; ++k) {
      const __m256 a0 = _mm256_loadu_ps(A + k * D + d0), a1 = _mm256_loadu_ps(A + k * D + d0 + 8);
      for (int i = 0; i < T; ++i) {
        const __m256 c = _mm256_broadcast_ss(C + i * r + k);
        acc[i][0] = _mm256_fmadd_ps(c, a0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(c, a1, acc[i][1]);
      }
    }
    for (int i = 0; i < T; ++i) {
      _mm256_storeu_ps(K + i * D + d0, acc[i][0]);
      _mm256_storeu_ps(K + i * D + d0 + 8, acc[i][1]);
    }
  }
  if (d0 < D) {  // 8 channels left
    __m256 acc[T];
    for (int i = 0; i < T; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < r; ++k) {
      const __m256 a = _mm256_loadu_ps(A + k * D + d0);
      for (int i = 0; i < T; ++i) acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(C + i * r + k), a, acc[i]);
    }
    for (int i = 0; i < T; ++i) _mm256_storeu_ps(K + i * D + d0, acc[i]);
  }
}
#else
template <int T>
inline void rebuild_keys(const float* C, int64_t r, const float* A, int64_t D, float* K) {
  for (int i = 0; i < T; ++i) {
    float* __restrict k = K + i * D;
    for (int64_t d = 0; d < D; ++d) k[d] = 0.f;
    for (int64_t j = 0; j < r; ++j) {
      const float c = C[i * r + j];
      const float* __restrict a = A + j * D;
      for (int64_t d = 0; d < D; ++d) k[d] += c * a[d];
    }
  }
}
#endif

// Scores of a part whose keys are held in a basis (see the layouts at the top), for batch x head bh:
// per block of B tokens, the r coefficients of each token dequantised (the block's scale and zero per
// coefficient), the B keys rebuilt (c @ axes[bh % H]), each turned by its position's angles
// (format.frame, sign +1: out_i = a cos - b sin, out_{i+D/2} = b cos + a sin, a = x_i, b = x_{i+D/2},
// angle pos * inv_freq[i] in fp32) and dotted with the g queries as they are (never rotated).
void basis_scores(const Part& P, int64_t bh, const float* qh, int64_t g, int64_t D, float* S, int64_t ld) {
  const int64_t B = P.block, nb = P.n / B, r = P.rank, half = D / 2;
  const float* A = P.axes + (bh % P.heads) * r * D;
  thread_local std::vector<float> buf;
  buf.resize(2 * r + B * r + B * D + 3 * B * half);
  float* sc = buf.data();
  float* zr = sc + r;
  float* coef = zr + r;       // [B, r]
  float* keys = coef + B * r; // [B, D]
  float* ang = keys + B * D;  // [B, D/2]
  float* cs = ang + B * half;
  float* sn = cs + B * half;
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t t0 = blk * B;
    P.ks.row((bh * nb + blk) * r, r, sc);
    P.kz.row((bh * nb + blk) * r, r, zr);
    for (int64_t t = 0; t < B; ++t) {
      const uint8_t* row = P.pk + (bh * P.n + t0 + t) * P.mk;
      float* ct = coef + t * r;
      for (int64_t i = 0, at = 0; i < P.ngroups; ++i) {  // each group's codes as unpack_row reads a row
        unpack_row(row, (int)P.gwidth[i], (int)P.gcount[i], ct + at);
        row += P.gcount[i] * P.gwidth[i] / 8;
        at += P.gcount[i];
      }
      for (int64_t j = 0; j < r; ++j) ct[j] = ct[j] * sc[j] + zr[j];
    }
    for (int64_t t = 0; t < B; ++t) {
      const float p = (float)P.pos[t0 + t];
      for (int64_t i = 0; i < half; ++i) ang[t * half + i] = p * P.inv_freq[i];
    }
    // two loops of their own, so the compiler can call its vector cosf / sinf (not one sincosf each)
    for (int64_t i = 0; i < B * half; ++i) cs[i] = std::cos(ang[i]);
    for (int64_t i = 0; i < B * half; ++i) sn[i] = std::sin(ang[i]);
    int64_t t = 0;
    for (; t + 4 <= B; t += 4) rebuild_keys<4>(coef + t * r, r, A, D, keys + t * D);
    for (; t < B; ++t) rebuild_keys<1>(coef + t * r, r, A, D, keys + t * D);
    for (t = 0; t < B; ++t) {
      float* __restrict k = keys + t * D;
      const float* __restrict c = cs + t * half;
      const float* __restrict s = sn + t * half;
      for (int64_t i = 0; i < half; ++i) {
        const float a = k[i], b = k[i + half];
        k[i] = a * c[i] - b * s[i];
        k[i + half] = b * c[i] + a * s[i];
      }
      for (int64_t j = 0; j < g; ++j) S[j * ld + t0 + t] = dot(qh + j * D, k, D);
    }
  }
}

// scores of part `P` for batch x head `bh`: S[j * ld + t] = q_j . k_t (+ bias_t), j < g, t < P.n.
// Scratch: codes [D], qs [g * max(D, R)], meta [2 * max(D, R) + g].
void part_scores(const Part& P, int64_t bh, const float* qh, int64_t g, int64_t D, float* S, int64_t ld,
                 float* codes, float* qs, float* meta) {
  if (!P.quantised) {
    for (int64_t t = 0; t < P.n; ++t) {
      P.k.row((bh * P.n + t) * D, D, codes);
      const float b = P.bias ? P.bias[t] : 0.f;
      for (int64_t j = 0; j < g; ++j) S[j * ld + t] = dot(qh + j * D, codes, D) + b;
    }
    return;
  }
  if (P.rank > 0) return basis_scores(P, bh, qh, g, D, S, ld);
  const int c = (int)P.container;
  if (P.block > 0) {  // keys per channel per block: fold the block's scales into q, its zeros into a bias
    const int64_t nb = P.n / P.block;
    float* zs = meta + D;
    float* bias = meta + 2 * D;
    for (int64_t blk = 0; blk < nb; ++blk) {
      P.ks.row((bh * nb + blk) * D, D, meta);
      P.kz.row((bh * nb + blk) * D, D, zs);
      for (int64_t j = 0; j < g; ++j) {
        float acc = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          qs[j * D + d] = qh[j * D + d] * meta[d];
          acc += qh[j * D + d] * zs[d];
        }
        bias[j] = acc;
      }
#if defined(__AVX2__)
      if (with_group(g, [&](auto G) { block_scores<decltype(G)::value>(P, bh, blk, D, qs, bias, S, ld); })) continue;
#endif
      for (int64_t t = blk * P.block; t < (blk + 1) * P.block; ++t) {
        unpack_row(P.pk + (bh * P.n + t) * P.mk, c, (int)D, codes);
        for (int64_t j = 0; j < g; ++j) S[j * ld + t] = dot(qs + j * D, codes, D) + bias[j];
      }
    }
    return;
  }
  const int64_t R = P.rk, gs = D / R;  // keys per token, R groups: sum_r s_r (q_r . c_r) + z_r sum(q_r)
  float* qsum = qs;
  for (int64_t j = 0; j < g * R; ++j) qsum[j] = 0.f;
  for (int64_t j = 0; j < g; ++j)
    for (int64_t d = 0; d < D; ++d) qsum[j * R + d / gs] += qh[j * D + d];
  float* s = meta;
  float* z = meta + R;
  for (int64_t t = 0; t < P.n; ++t) {
    unpack_row(P.pk + (bh * P.n + t) * P.mk, c, (int)D, codes);
    P.ks.row((bh * P.n + t) * R, R, s);
    P.kz.row((bh * P.n + t) * R, R, z);
    for (int64_t j = 0; j < g; ++j) {
      const float* qj = qh + j * D;
      float acc = 0.f;
      for (int64_t r = 0; r < R; ++r) acc += s[r] * dot(qj + r * gs, codes + r * gs, gs) + z[r] * qsum[j * R + r];
      S[j * ld + t] = acc;
    }
  }
}

// Logit softcapping (Gemma2's attn_logit_softcapping, agacc.attention.cap_logits) of part `P`'s scores,
// computed by part_scores without the part's bias: S[j * ld + t] <- c * tanh(S / c) (+ bias_t), the bias
// added after the cap, as agacc.decode does. A pass of its own, so part_scores (the uncapped path) is
// what it was: under -ffast-math a cap inside its loops changed how they compiled, and their sums.
void cap_scores(const Part& P, int64_t g, float* S, int64_t ld, float c) {
  for (int64_t j = 0; j < g; ++j) {
    float* row = S + j * ld;
    if (P.bias)
      for (int64_t t = 0; t < P.n; ++t) row[t] = std::tanh(row[t] / c) * c + P.bias[t];
    else
      for (int64_t t = 0; t < P.n; ++t) row[t] = std::tanh(row[t] / c) * c;
  }
}

// out_j += sum_t p_j,t v_t over part `P` for batch x head `bh` (values per token, R groups when quantised)
void part_values(const Part& P, int64_t bh, const float* ph, int64_t g, int64_t D, int64_t ld, float* oh,
                 float* codes, float* meta) {
  const int64_t R = P.quantised ? P.rv : 1, gs = D / R;
  float* s = meta;
  float* z = meta + R;
#if defined(__AVX2__)
  if (P.quantised && P.rv <= 8 && with_group(g, [&](auto G) { quant_values<decltype(G)::value>(P, bh, ph, D, ld, oh); })) return;
#endif
  for (int64_t t = 0; t < P.n; ++t) {
    if (P.quantised) {
      unpack_row(P.pv + (bh * P.n + t) * P.m, (int)P.container, (int)D, codes);
      P.vs.row((bh * P.n + t) * R, R, s);
      P.vz.row((bh * P.n + t) * R, R, z);
    } else {
      P.v.row((bh * P.n + t) * D, D, codes);
      s[0] = 1.f;
      z[0] = 0.f;
    }
    for (int64_t j = 0; j < g; ++j) {
      const float w = ph[j * ld + t];
      float* __restrict oj = oh + j * D;
      for (int64_t r = 0; r < R; ++r) {
        const float a = w * s[r], b = w * z[r];
        for (int64_t d = r * gs; d < (r + 1) * gs; ++d) oj[d] += a * codes[d] + b;
      }
    }
  }
}

// x [rows, D] <- x with every run of r = D & -D channels multiplied by the orthonormal Sylvester-Hadamard
// matrix (agacc.quant.rotate): in-place butterflies, then the 1/sqrt(r) scale
void hadamard_rows(float* x, int64_t rows, int64_t D) {
  const int64_t r = D & -D;
  const float scale = 1.f / std::sqrt((float)r);
  for (int64_t base = 0; base < rows * D; base += r) {
    float* v = x + base;
    for (int64_t h = 1; h < r; h *= 2)
      for (int64_t i = 0; i < r; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {
          const float a = v[j], b = v[j + h];
          v[j] = a + b;
          v[j + h] = a - b;
        }
    for (int64_t j = 0; j < r; ++j) v[j] *= scale;
  }
}

}  // namespace

// One decode step of one layer over every part it stores.
//   q        [BH, g, D] fp32: the scaled query
//   tensors  the parts' tensors in order: a dense part takes 3 (k [Bt,H,n,D], v, bias [n] fp32 or an
//            empty tensor), a quantised part 6 (k codes, k scale, k zero, v codes, v scale, v zero), a
//            quantised part with keys in a basis 9 (those 6, then axes [H, r, D] fp32, inv_freq [D/2] fp32,
//            pos [n] int32)
//   meta     kMeta = 12 ints per part: quantised (0/1), container (the values'; the keys' too outside a
//            basis), block (keys per channel per block of this many tokens; 0: per token), rotated (0/1;
//            a basis part: its values alone), then kGroups = 4 pairs (width, count): the key groups of a
//            basis part (Part.key_groups, in row order; r = the counts' sum), unused pairs (0, 0); all
//            four unused: no basis
//   softcap  logit softcapping c (0: off): every logit z = q . k becomes c * tanh(z / c), then the part's
//            bias is added (agacc.decode's order: cap, then bias); softmax, output and mass use the result
// -> [out [BH, g, D], mass [N]]: softmax over all N entries; mass_t = sum over bh, j of p / (BH * g)
//    (agacc.decode's normalisation). Rotated parts (Hadamard runs of D & -D channels, agacc.quant.rotate)
//    meet the rotated query, and their share of the output is rotated back once: (P V H) H = P V.
std::vector<torch::Tensor> decode_layer(torch::Tensor q, std::vector<torch::Tensor> tensors, std::vector<int64_t> meta,
                                        double softcap) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && q.is_contiguous() && q.dim() == 3, "q: fp32 [BH, g, D]");
  constexpr size_t kMeta = 12, kGroups = 4;
  TORCH_CHECK(meta.size() % kMeta == 0, "meta: ", kMeta, " ints per part");
  const int64_t BH = q.size(0), g = q.size(1), D = q.size(2);
  TORCH_CHECK(D % 8 == 0, "head dim must be a multiple of 8");
  TORCH_CHECK(softcap >= 0, "softcap: c > 0, or 0 for none");  // (NaN, inf: kernels/cpu.py rejects them)
  const bool capped = softcap != 0;
  const float cap = (float)softcap;
  std::vector<Part> parts(meta.size() / kMeta);
  std::vector<torch::Tensor> held;  // contiguous copies live until the end
  size_t ti = 0;
  auto next = [&](const char* what) {
    TORCH_CHECK(ti < tensors.size(), "missing tensor: ", what);
    held.push_back(tensors[ti++].contiguous());
    return held.back();
  };
  int64_t N = 0, max_r = 1;
  bool rotated = false;
  for (size_t i = 0; i < parts.size(); ++i) {
    Part& P = parts[i];
    const int64_t* mi = meta.data() + kMeta * i;
    P.quantised = mi[0] != 0;
    P.container = mi[1];
    P.block = mi[2];
    P.rotated = mi[3] != 0;
    rotated |= P.rotated;
    int64_t key_bits = 0;  // a basis part's key row, in bits
    for (size_t j = 0; j < kGroups; ++j) {
      const int64_t w = mi[4 + 2 * j], cnt = mi[5 + 2 * j];
      if (cnt == 0) continue;
      TORCH_CHECK(P.quantised && cnt > 0 && (w == 2 || w == 3 || w == 4 || w == 8) && cnt % (w == 3 ? 8 : 8 / w) == 0,
                  "basis key group (", w, ", ", cnt, "): width 2, 3, 4 or 8, whole bytes of codes, a quantised part");
      P.gwidth[P.ngroups] = w;
      P.gcount[P.ngroups++] = cnt;
      P.rank += cnt;
      key_bits += w * cnt;
    }
    if (!P.quantised) {
      auto k = next("k"), v = next("v"), b = next("bias");
      TORCH_CHECK(k.dim() == 4 && k.size(0) * k.size(1) == BH && k.size(3) == D && v.sizes() == k.sizes(),
                  "dense k, v: [Bt, H, n, D]");
      P.n = k.size(2);
      P.k = FloatData(k);
      P.v = FloatData(v);
      if (b.numel()) {
        TORCH_CHECK(b.scalar_type() == torch::kFloat && b.numel() == P.n, "bias: fp32 [n]");
        P.bias = b.data_ptr<float>();
      }
    } else {
      auto pk = next("k codes"), ks = next("k scale"), kz = next("k zero");
      auto pv = next("v codes"), vs = next("v scale"), vz = next("v zero");
      const int c = (int)P.container;
      check_codes(pv, c, D);
      TORCH_CHECK(pk.scalar_type() == torch::kUInt8 && pk.dim() == 4 && pk.size(0) * pk.size(1) == BH &&
                      pk.sizes().slice(0, 3) == pv.sizes().slice(0, 3),
                  "k, v codes: uint8 [Bt, H, n, m], batch x heads as q");
      if (P.rank == 0) {
        check_codes(pk, c, D);
      } else {
        TORCH_CHECK(pk.size(3) * 8 == key_bits, "basis key rows: ", pk.size(3), " bytes, the groups' ", key_bits / 8);
      }
      P.n = pk.size(2);
      P.m = pv.size(3);
      P.mk = pk.size(3);
      P.pk = pk.data_ptr<uint8_t>();
      P.pv = pv.data_ptr<uint8_t>();
      P.ks = FloatData(ks), P.kz = FloatData(kz), P.vs = FloatData(vs), P.vz = FloatData(vz);
      TORCH_CHECK(kz.sizes() == ks.sizes() && vz.sizes() == vs.sizes() && vs.size(2) == P.n && D % vs.size(3) == 0,
                  "scales / zeros: same shapes; values [Bt, H, n, R]");
      if (P.rank > 0) {
        TORCH_CHECK(P.block > 0 && P.n % P.block == 0 && ks.size(2) == P.n / P.block && ks.size(3) == P.rank,
                    "basis key scales: [Bt, H, n/B, r], keys per coefficient per block");
        auto axes = next("axes"), inv_freq = next("inv_freq"), pos = next("pos");
        TORCH_CHECK(axes.scalar_type() == torch::kFloat && axes.dim() == 3 && axes.size(0) == pk.size(1) &&
                        axes.size(1) == P.rank && axes.size(2) == D, "basis axes: fp32 [H, r, D]");
        TORCH_CHECK(inv_freq.scalar_type() == torch::kFloat && inv_freq.numel() == D / 2, "inv_freq: fp32 [D/2]");
        TORCH_CHECK(pos.scalar_type() == torch::kInt && pos.numel() == P.n, "pos: int32 [n]");
        P.heads = axes.size(0);
        P.axes = axes.data_ptr<float>();
        P.inv_freq = inv_freq.data_ptr<float>();
        P.pos = pos.data_ptr<int32_t>();
      } else if (P.block > 0) {
        TORCH_CHECK(P.n % P.block == 0 && ks.size(2) == P.n / P.block && ks.size(3) == D, "channel key scales: [Bt, H, n/B, D]");
      } else {
        TORCH_CHECK(ks.size(2) == P.n && D % ks.size(3) == 0, "token key scales: [Bt, H, n, R]");
        P.rk = ks.size(3);
      }
      P.rv = vs.size(3);
      max_r = std::max({max_r, P.rk, P.rv});
    }
    N += P.n;
  }
  TORCH_CHECK(ti == tensors.size(), "more tensors than the parts take");
  std::vector<Part> unbiased;  // capped: the parts scored without their bias (cap_scores adds it after the cap)
  if (capped) {
    unbiased = parts;
    for (Part& P : unbiased) P.bias = nullptr;
  }
  const std::vector<Part>& scored = capped ? unbiased : parts;
  auto probs = torch::empty({BH, g, N}, q.options());
  auto out = torch::zeros({BH, g, D}, q.options());
  const float* qp = q.data_ptr<float>();
  float* pp = probs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, BH, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> codes(D), qs(g * std::max(D, max_r)), meta_buf(2 * std::max(D, max_r) + g);
    std::vector<float> q_rot(rotated ? g * D : 0), out_rot(rotated ? g * D : 0);
    for (int64_t bh = b0; bh < b1; ++bh) {
      const float* qh = qp + bh * g * D;
      float* oh = op + bh * g * D;
      if (rotated) {
        std::copy(qh, qh + g * D, q_rot.begin());
        hadamard_rows(q_rot.data(), g, D);
        std::fill(out_rot.begin(), out_rot.end(), 0.f);
      }
      float* S = pp + bh * g * N;
      int64_t off = 0;
      for (const Part& P : scored) {
        const bool turned = P.rotated && P.rank == 0;  // keys in a basis are never rotated (their values may be)
        part_scores(P, bh, turned ? q_rot.data() : qh, g, D, S + off, N, codes.data(), qs.data(), meta_buf.data());
        off += P.n;
      }
      if (capped) {
        off = 0;
        for (const Part& P : parts) {
          cap_scores(P, g, S + off, N, cap);
          off += P.n;
        }
      }
      for (int64_t j = 0; j < g; ++j) {  // softmax over all N entries
        float* row = S + j * N;
        float mx = -INFINITY, sum = 0.f;
        for (int64_t t = 0; t < N; ++t) mx = std::max(mx, row[t]);
        int64_t t0 = 0;
#if defined(__AVX2__)
        __m256 vsum = _mm256_setzero_ps();
        for (; t0 + 8 <= N; t0 += 8) {
          const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + t0), _mm256_set1_ps(mx)));
          _mm256_storeu_ps(row + t0, e);
          vsum = _mm256_add_ps(vsum, e);
        }
        sum = hsum(vsum);
#endif
        for (int64_t t = t0; t < N; ++t) sum += (row[t] = std::exp(row[t] - mx));
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < N; ++t) row[t] *= inv;
      }
      off = 0;
      for (const Part& P : parts) {
        part_values(P, bh, S + off, g, D, N, P.rotated ? out_rot.data() : oh, codes.data(), meta_buf.data());
        off += P.n;
      }
      if (rotated) {
        hadamard_rows(out_rot.data(), g, D);
        for (int64_t i = 0; i < g * D; ++i) oh[i] += out_rot[i];
      }
    }
  });
  auto mass = torch::zeros({N}, q.options());
  float* mp = mass.data_ptr<float>();
  const float norm = 1.f / (float)(BH * g);
  for (int64_t r = 0; r < BH * g; ++r)
    for (int64_t t = 0; t < N; ++t) mp[t] += pp[r * N + t];
  for (int64_t t = 0; t < N; ++t) mp[t] *= norm;
  return {out, mass};
}
