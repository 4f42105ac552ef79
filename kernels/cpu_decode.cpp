// Fused CPU decode over packed quantised KV blocks: unpack + dequantise + dot product in one pass,
// with no float copy of the segment (the PyTorch path in agacc/decode.py is the reference).
//
// Layouts (agacc/store.py, agacc/quant.py):
//   packed  uint8 [BH, n, m]: one row of m = D * c / 8 bytes per token, container c in {2, 3, 4, 8};
//           code j of byte i (bit j * c) is channel i * (8 / c) + j; the 3-bit container is a 2-bit
//           plane (D / 4 bytes) followed by a 1-bit plane of the high bits (D / 8 bytes).
//   keys    per channel per block (scale/zero [BH, n / B, D]) or per token (scale/zero [BH, n, R],
//           R groups of D / R channels); values per token (scale/zero [BH, n, R]).
//   x = code * scale + zero.
// BH = batch x KV heads; g query heads share a KV head (GQA). All floats are fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

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

inline void unpack_row(const uint8_t* row, int c, int D, float* out) {
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

void check(const torch::Tensor& packed, const torch::Tensor& scale, const torch::Tensor& zero, int c, int D) {
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() && packed.dim() == 3, "packed: uint8 [BH, n, m]");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && zero.sizes() == scale.sizes() &&
              zero.scalar_type() == torch::kFloat && zero.is_contiguous(), "scale/zero: fp32, same shape, contiguous");
  TORCH_CHECK(c == 2 || c == 3 || c == 4 || c == 8, "container must be 2, 3, 4 or 8");
  TORCH_CHECK(packed.size(2) * 8 == D * c && D % 8 == 0, "row bytes ", packed.size(2), " do not hold ", D, " codes of ", c, " bits");
}

}  // namespace

// q [BH, g, D] fp32 (scaled, rotated when the segment is) -> scores [BH, g, n] fp32.
// block > 0: keys per channel per block of `block` tokens (scale [BH, n/block, D]); block == 0: per
// token (scale [BH, n, R]).
torch::Tensor key_scores(torch::Tensor q, torch::Tensor packed, torch::Tensor scale, torch::Tensor zero,
                         int64_t container, int64_t block) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && q.is_contiguous() && q.dim() == 3, "q: fp32 [BH, g, D]");
  const int64_t BH = q.size(0), g = q.size(1), D = q.size(2), n = packed.size(1), m = packed.size(2);
  check(packed, scale, zero, (int)container, (int)D);
  TORCH_CHECK(packed.size(0) == BH && scale.size(0) == BH, "batch x heads mismatch");
  if (block > 0) {
    TORCH_CHECK(n % block == 0 && scale.size(1) == n / block && scale.size(2) == D, "channel scales: [BH, n/B, D]");
  } else {
    TORCH_CHECK(scale.size(1) == n && D % scale.size(2) == 0, "token scales: [BH, n, R]");
  }
  auto out = torch::empty({BH, g, n}, q.options());
  const float* qp = q.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, BH, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> codes(D), qs(g * D), qsum;
    std::vector<float> bias(g);
    for (int64_t bh = b0; bh < b1; ++bh) {
      const float* qh = qp + bh * g * D;
      float* oh = op + bh * g * n;
      if (block > 0) {
        const int64_t nb = n / block;
        for (int64_t blk = 0; blk < nb; ++blk) {
          const float* s = sp + (bh * nb + blk) * D;
          const float* z = zp + (bh * nb + blk) * D;
          for (int64_t j = 0; j < g; ++j) {  // fold the block's scales into the query, its zeros into a bias
            float acc = 0.f;
            for (int64_t d = 0; d < D; ++d) {
              qs[j * D + d] = qh[j * D + d] * s[d];
              acc += qh[j * D + d] * z[d];
            }
            bias[j] = acc;
          }
          for (int64_t t = blk * block; t < (blk + 1) * block; ++t) {
            unpack_row(pp + (bh * n + t) * m, (int)container, (int)D, codes.data());
            for (int64_t j = 0; j < g; ++j) oh[j * n + t] = dot(qs.data() + j * D, codes.data(), D) + bias[j];
          }
        }
      } else {
        const int64_t R = scale.size(2), gs = D / R;
        qsum.assign(g * R, 0.f);
        for (int64_t j = 0; j < g; ++j)
          for (int64_t d = 0; d < D; ++d) qsum[j * R + d / gs] += qh[j * D + d];
        for (int64_t t = 0; t < n; ++t) {
          unpack_row(pp + (bh * n + t) * m, (int)container, (int)D, codes.data());
          const float* s = sp + (bh * n + t) * R;
          const float* z = zp + (bh * n + t) * R;
          for (int64_t j = 0; j < g; ++j) {
            const float* qj = qh + j * D;
            float acc = 0.f;
            for (int64_t r = 0; r < R; ++r)
              acc += s[r] * dot(qj + r * gs, codes.data() + r * gs, gs) + z[r] * qsum[j * R + r];
            oh[j * n + t] = acc;
          }
        }
      }
    }
  });
  return out;
}

// p [BH, g, n] fp32 (probabilities of this segment's entries) -> sum_t p_t v_t [BH, g, D] fp32,
// values per token (scale/zero [BH, n, R]).
torch::Tensor value_out(torch::Tensor p, torch::Tensor packed, torch::Tensor scale, torch::Tensor zero,
                        int64_t container) {
  TORCH_CHECK(p.scalar_type() == torch::kFloat && p.is_contiguous() && p.dim() == 3, "p: fp32 [BH, g, n]");
  const int64_t BH = p.size(0), g = p.size(1), n = p.size(2), m = packed.size(2);
  const int64_t D = m * 8 / container;
  check(packed, scale, zero, (int)container, (int)D);
  TORCH_CHECK(packed.size(0) == BH && packed.size(1) == n && scale.size(1) == n && D % scale.size(2) == 0,
              "values: packed [BH, n, m], scales [BH, n, R]");
  const int64_t R = scale.size(2), gs = D / R;
  auto out = torch::zeros({BH, g, D}, p.options());
  const float* ppr = p.data_ptr<float>();
  const uint8_t* pk = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, BH, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> codes(D);
    for (int64_t bh = b0; bh < b1; ++bh) {
      const float* ph = ppr + bh * g * n;
      float* oh = op + bh * g * D;
      for (int64_t t = 0; t < n; ++t) {
        unpack_row(pk + (bh * n + t) * m, (int)container, (int)D, codes.data());
        const float* s = sp + (bh * n + t) * R;
        const float* z = zp + (bh * n + t) * R;
        for (int64_t j = 0; j < g; ++j) {
          const float w = ph[j * n + t];
          float* __restrict oj = oh + j * D;
          const float* __restrict c = codes.data();
          for (int64_t r = 0; r < R; ++r) {
            const float a = w * s[r], b = w * z[r];
            for (int64_t d = r * gs; d < (r + 1) * gs; ++d) oj[d] += a * c[d] + b;
          }
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("key_scores", &key_scores, "q . k over packed keys");
  m.def("value_out", &value_out, "sum_t p_t v_t over packed values");
}
