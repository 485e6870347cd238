// CPU dequantization kernels for 4-bit weights, as MLX primitives (see cpu_kernels.py).
//
// MLX's CPU backend has no fused lookup (NF4 through mx.take pays per gathered element, and even the
// compiled affine unpacking is slower than one write per weight: bench/README.md, "Measurements
// behind code choices"). These loops write each weight once.
// They compute exactly what the MLX-op versions in codes.py compute, in the same
// dtype and order (value * scale, then + bias, each rounded to the scales' dtype), so results are
// unchanged; cpu_kernels.py checks that on load and falls back to the MLX ops otherwise.

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>

#include <optional>
#include <type_traits>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

// The NF4 data type (QLoRA, Appendix E), as float32 like NF4_CODEBOOK in nf4.py.
constexpr float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

constexpr const char* kScalesDtypeError =
    "[bit_axon] dequantize: scales must be float32, bfloat16 or float16";

// Values per packed uint32: 8 NF4 codes (bits == 0) or 32 / bits affine codes.
int values_per_word(int bits) { return bits == 0 ? 8 : 32 / bits; }

mx::array make_dequantize(std::vector<mx::array> inputs, int bits, std::optional<mx::Dtype> dtype,
                          mx::StreamOrDevice s);

// Rows are the last axis: packed words (..., words) and per-group parameters (..., groups), any
// strides (slices of a stacked weight are not contiguous); the output is contiguous.
struct RowLayout {
  mx::Shape lead;
  std::vector<mx::Strides> strides;  // per input: leading-axis strides, then the last axis's

  RowLayout(const std::vector<mx::array>& inputs)
      : lead(inputs[0].shape().begin(), inputs[0].shape().end() - 1) {
    for (auto& a : inputs) {
      strides.emplace_back(a.strides().begin(), a.strides().end());
    }
  }

  int64_t rows() const {
    int64_t n = 1;
    for (auto d : lead) n *= d;
    return n;
  }

  // Element offset of row `r` in input `i`.
  int64_t offset(int64_t r, size_t i) const {
    int64_t off = 0;
    for (int d = static_cast<int>(lead.size()) - 1; d >= 0; --d) {
      off += (r % lead[d]) * strides[i][d];
      r /= lead[d];
    }
    return off;
  }

  int64_t last_stride(size_t i) const { return strides[i].back(); }
};

// Each kernel computes in the scales' type T and writes O: T, or float32 (the same values,
// widened exactly), which saves the consumer a conversion pass.
template <typename T, typename O>
void nf4_rows(const uint32_t* packed, const T* scales, O* out, const RowLayout& layout,
              int64_t words, int64_t groups) {
  // Rounded to T first, as nf4.py does (the table is cast to the scales' dtype).
  T table[16];
  for (int i = 0; i < 16; ++i) table[i] = static_cast<T>(kNF4[i]);
  const int64_t words_per_group = words / groups;
  const int64_t ws = layout.last_stride(0), ss = layout.last_stride(1);
  for (int64_t r = 0, rows = layout.rows(); r < rows; ++r) {
    const uint32_t* p = packed + layout.offset(r, 0);
    const T* s = scales + layout.offset(r, 1);
    O* o = out + r * words * 8;
    for (int64_t g = 0; g < groups; ++g) {
      const T scale = s[g * ss];
      for (int64_t w = g * words_per_group; w < (g + 1) * words_per_group; ++w) {
        const uint32_t word = p[w * ws];
        for (int k = 0; k < 8; ++k) {
          o[w * 8 + k] = static_cast<O>(static_cast<T>(table[(word >> (4 * k)) & 0xF] * scale));
        }
      }
    }
  }
}

// BITS is a template parameter so that the per-word loop has constant shifts and unrolls.
template <typename T, typename O, int BITS>
void affine_rows(const uint32_t* packed, const T* scales, const T* biases, O* out,
                 const RowLayout& layout, int64_t words, int64_t groups) {
  constexpr int per_word = 32 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1;
  const int64_t words_per_group = words / groups;
  const int64_t ws = layout.last_stride(0), ss = layout.last_stride(1), bs = layout.last_stride(2);
  for (int64_t r = 0, rows = layout.rows(); r < rows; ++r) {
    const uint32_t* p = packed + layout.offset(r, 0);
    const T* s = scales + layout.offset(r, 1);
    const T* b = biases + layout.offset(r, 2);
    O* o = out + r * words * per_word;
    for (int64_t g = 0; g < groups; ++g) {
      const T scale = s[g * ss], bias = b[g * bs];
      for (int64_t w = g * words_per_group; w < (g + 1) * words_per_group; ++w) {
        const uint32_t word = p[w * ws];
        for (int k = 0; k < per_word; ++k) {
          // Two roundings, as the MLX ops: (code * scale) in T, then + bias in T.
          const T scaled = static_cast<T>((word >> (BITS * k)) & mask) * scale;
          o[w * per_word + k] = static_cast<O>(static_cast<T>(scaled + bias));
        }
      }
    }
  }
}

#if defined(__x86_64__)
#define BIT_AXON_F16C 1
// float16 scales without native half arithmetic: MLX's software half type converts through
// float32 on every operation, which made the loops above some 30x slower than with float32
// scales (bench/README.md, "SmolLM2-135M-Instruct" under training throughput). The same values, 8 at a time,
// with the F16C conversions. Products are exact in float32 (an integer code of at most 8 bits,
// or an NF4 value in half, times an 11-bit significand), so rounding one to half once is the
// half product; a sum is rounded as the software type rounds it (float32 add, then to half).
#define BIT_AXON_F16C_TARGET __attribute__((target("avx2,f16c")))

BIT_AXON_F16C_TARGET inline __m128i round_to_half(__m256 x) {
  return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
}

template <typename O>
BIT_AXON_F16C_TARGET inline void store8(O* o, __m128i halves) {
  if constexpr (std::is_same_v<O, float>) {
    _mm256_storeu_ps(o, _mm256_cvtph_ps(halves));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o), halves);
  }
}

// Codes of values v .. v + 7 of a row (v a multiple of 8) as int32 lanes.
template <int BITS>
BIT_AXON_F16C_TARGET inline __m256i codes8(const uint32_t* p, int64_t ws, int64_t v, __m256i shifts) {
  constexpr int per_word = 32 / BITS;
  __m256i words;
  if constexpr (per_word >= 8) {
    words = _mm256_set1_epi32(static_cast<int32_t>(p[(v / per_word) * ws] >> (BITS * (v % per_word))));
  } else {  // 8 bits: two words
    const int64_t w = v / per_word;
    words = _mm256_setr_m128i(_mm_set1_epi32(static_cast<int32_t>(p[w * ws])),
                              _mm_set1_epi32(static_cast<int32_t>(p[(w + 1) * ws])));
  }
  return _mm256_and_si256(_mm256_srlv_epi32(words, shifts), _mm256_set1_epi32((1u << BITS) - 1));
}

template <int BITS>
BIT_AXON_F16C_TARGET inline __m256i lane_shifts() {
  alignas(32) int32_t shift[8];
  for (int i = 0; i < 8; ++i) shift[i] = BITS * (i % (32 / BITS));
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(shift));
}

BIT_AXON_F16C_TARGET inline float half_value(mx::float16_t h) { return _cvtsh_ss(h.bits_); }

template <typename O, int BITS>
BIT_AXON_F16C_TARGET void affine_rows_f16c(const uint32_t* packed, const mx::float16_t* scales,
                                           const mx::float16_t* biases, O* out, const RowLayout& layout,
                                           int64_t words, int64_t groups) {
  const int64_t per_group = words / groups * (32 / BITS);  // a multiple of 8 (the caller checks)
  const int64_t ws = layout.last_stride(0), ss = layout.last_stride(1), bs = layout.last_stride(2);
  const __m256i shifts = lane_shifts<BITS>();
  for (int64_t r = 0, rows = layout.rows(); r < rows; ++r) {
    const uint32_t* p = packed + layout.offset(r, 0);
    const mx::float16_t* s = scales + layout.offset(r, 1);
    const mx::float16_t* b = biases + layout.offset(r, 2);
    O* o = out + r * words * (32 / BITS);
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 scale = _mm256_set1_ps(half_value(s[g * ss]));
      const __m256 bias = _mm256_set1_ps(half_value(b[g * bs]));
      for (int64_t v = g * per_group; v < (g + 1) * per_group; v += 8) {
        const __m256 codes = _mm256_cvtepi32_ps(codes8<BITS>(p, ws, v, shifts));
        const __m256 scaled = _mm256_cvtph_ps(round_to_half(_mm256_mul_ps(codes, scale)));
        store8(o + v, round_to_half(_mm256_add_ps(scaled, bias)));
      }
    }
  }
}

template <typename O>
BIT_AXON_F16C_TARGET void nf4_rows_f16c(const uint32_t* packed, const mx::float16_t* scales, O* out,
                                        const RowLayout& layout, int64_t words, int64_t groups) {
  // The table rounded to half, as nf4_rows does; codes 0-7 and 8-15 looked up with one permute each.
  alignas(32) float table[16];
  for (int i = 0; i < 16; ++i) table[i] = static_cast<float>(static_cast<mx::float16_t>(kNF4[i]));
  const __m256 low = _mm256_load_ps(table), high = _mm256_load_ps(table + 8);
  const int64_t per_group = words / groups * 8;
  const int64_t ws = layout.last_stride(0), ss = layout.last_stride(1);
  const __m256i shifts = lane_shifts<4>();
  for (int64_t r = 0, rows = layout.rows(); r < rows; ++r) {
    const uint32_t* p = packed + layout.offset(r, 0);
    const mx::float16_t* s = scales + layout.offset(r, 1);
    O* o = out + r * words * 8;
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 scale = _mm256_set1_ps(half_value(s[g * ss]));
      for (int64_t v = g * per_group; v < (g + 1) * per_group; v += 8) {
        const __m256i codes = codes8<4>(p, ws, v, shifts);
        const __m256 is_high = _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28));  // bit 3 -> sign
        const __m256 values = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, codes),
                                               _mm256_permutevar8x32_ps(high, codes), is_high);
        store8(o + v, round_to_half(_mm256_mul_ps(values, scale)));
      }
    }
  }
}

bool has_f16c() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return supported;
}
#endif

// Calls f with a value of the C++ type of `dtype` (the scales' dtype).
template <typename F>
void dispatch_float(mx::Dtype dtype, F&& f) {
  switch (dtype) {
    case mx::float32:
      return f(float{});
    case mx::bfloat16:
      return f(mx::bfloat16_t{});
    case mx::float16:
      return f(mx::float16_t{});
    default:  // (check_inputs refuses other dtypes before a graph is built)
      throw std::invalid_argument(kScalesDtypeError);
  }
}

class Dequantize : public mx::UnaryPrimitive {
 public:
  // bits == 0 means NF4 (inputs: packed, scales); otherwise affine (packed, scales, biases).
  Dequantize(mx::Stream stream, int bits, mx::Dtype out_dtype)
      : mx::UnaryPrimitive(stream), bits_(bits), out_dtype_(out_dtype) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    dispatch_float(inputs[1].dtype(), [&](auto tag) {
      using T = decltype(tag);
      if (out.dtype() == inputs[1].dtype()) {
        run<T, T>(inputs, out, encoder);
      } else {
        run<T, float>(inputs, out, encoder);  // make_dequantize allows only these two
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[bit_axon] the dequantization kernels run on the CPU only");
  }

  // Gradients w.r.t. scales (and biases) only: the codes are integers. Base weights are frozen,
  // so training never asks for these; they keep the op differentiable like the MLX-op version.
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>&) override {
    auto& ct = cotangents[0];
    auto& scales = primals[1];
    mx::Shape grouped = scales.shape();
    grouped.push_back(-1);
    auto per_group = [&](const mx::array& a) {
      return mx::sum(mx::reshape(a, grouped, stream()), -1, false, stream());
    };
    std::vector<mx::array> grads;
    for (int i : argnums) {
      if (i == 0) {
        grads.push_back(mx::zeros_like(primals[0], stream()));
      } else if (i == 1) {
        // d value / d scale: the code's value at scale 1 (and bias 0).
        std::vector<mx::array> unit = {primals[0], mx::ones_like(scales, stream())};
        if (bits_ != 0) unit.push_back(mx::zeros_like(scales, stream()));
        auto values = make_dequantize(std::move(unit), bits_, std::nullopt, stream());
        grads.push_back(mx::astype(per_group(mx::multiply(ct, values, stream())), scales.dtype(), stream()));
      } else {
        grads.push_back(mx::astype(per_group(ct), primals[2].dtype(), stream()));
      }
    }
    return grads;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.back() *= values_per_word(bits_);
    return {shape};
  }

  const char* name() const override { return bits_ == 0 ? "NF4Dequantize" : "AffineDequantize"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& that = static_cast<const Dequantize&>(other);
    return bits_ == that.bits_ && out_dtype_ == that.out_dtype_;
  }

 private:
  template <typename T, typename O>
  void run(const std::vector<mx::array>& inputs, mx::array& out, mx::cpu::CommandEncoder& encoder) {
    const int64_t words = inputs[0].shape(-1), groups = inputs[1].shape(-1);
    const uint32_t* packed = inputs[0].data<uint32_t>();
    const T* scales = inputs[1].data<T>();
    O* o = out.data<O>();
    RowLayout layout(inputs);
    [[maybe_unused]] const bool f16c_fits = (words / groups * values_per_word(bits_)) % 8 == 0;
    if (bits_ == 0) {
      auto rows = nf4_rows<T, O>;
#ifdef BIT_AXON_F16C
      if constexpr (std::is_same_v<T, mx::float16_t>) {
        if (has_f16c() && f16c_fits) rows = nf4_rows_f16c<O>;
      }
#endif
      encoder.dispatch([=, layout = std::move(layout)]() { rows(packed, scales, o, layout, words, groups); });
      return;
    }
    const T* biases = inputs[2].data<T>();
    auto rows = bits_ == 2 ? affine_rows<T, O, 2> : bits_ == 4 ? affine_rows<T, O, 4> : affine_rows<T, O, 8>;
#ifdef BIT_AXON_F16C
    if constexpr (std::is_same_v<T, mx::float16_t>) {
      if (has_f16c() && f16c_fits) {
        rows = bits_ == 2 ? affine_rows_f16c<O, 2> : bits_ == 4 ? affine_rows_f16c<O, 4> : affine_rows_f16c<O, 8>;
      }
    }
#endif
    encoder.dispatch([=, layout = std::move(layout)]() { rows(packed, scales, biases, o, layout, words, groups); });
  }

  int bits_;
  mx::Dtype out_dtype_;
};

void check_inputs(const std::vector<mx::array>& inputs) {
  auto& packed = inputs[0];
  if (packed.dtype() != mx::uint32 || packed.ndim() == 0) {
    throw std::invalid_argument("[bit_axon] dequantize: packed weights must be a uint32 array");
  }
  const auto dtype = inputs[1].dtype();
  if (dtype != mx::float32 && dtype != mx::bfloat16 && dtype != mx::float16) {
    throw std::invalid_argument(kScalesDtypeError);
  }
  for (size_t i = 1; i < inputs.size(); ++i) {
    auto& a = inputs[i];
    if (a.dtype() != dtype) {
      throw std::invalid_argument("[bit_axon] dequantize: scales and biases must share a dtype");
    }
    if (a.ndim() != packed.ndim() ||
        !std::equal(a.shape().begin(), a.shape().end() - 1, packed.shape().begin())) {
      throw std::invalid_argument("[bit_axon] dequantize: scales must match the packed weights' leading shape");
    }
  }
  const int64_t groups = inputs[1].shape(-1);
  if (groups == 0 || packed.shape(-1) % groups != 0) {
    throw std::invalid_argument("[bit_axon] dequantize: the number of groups must divide the packed words");
  }
}

// The output is in the scales' dtype, or in float32 when `dtype` asks for it: the same values.
mx::array make_dequantize(std::vector<mx::array> inputs, int bits, std::optional<mx::Dtype> dtype,
                          mx::StreamOrDevice s) {
  check_inputs(inputs);
  auto shape = inputs[0].shape();
  shape.back() *= values_per_word(bits);
  const auto out_dtype = dtype.value_or(inputs[1].dtype());
  if (out_dtype != inputs[1].dtype() && out_dtype != mx::float32) {
    throw std::invalid_argument("[bit_axon] dequantize: dtype must be the scales' dtype or float32");
  }
  return mx::array(std::move(shape), out_dtype, std::make_shared<Dequantize>(mx::to_stream(s), bits, out_dtype),
                   std::move(inputs));
}

mx::array nf4_dequantize(const mx::array& packed, const mx::array& scales, std::optional<mx::Dtype> dtype,
                         mx::StreamOrDevice s) {
  return make_dequantize({packed, scales}, 0, dtype, s);
}

mx::array affine_dequantize(const mx::array& packed, const mx::array& scales, const mx::array& biases,
                            int bits, std::optional<mx::Dtype> dtype, mx::StreamOrDevice s) {
  if (bits != 2 && bits != 4 && bits != 8) {
    throw std::invalid_argument("[bit_axon] affine_dequantize: bits must be 2, 4 or 8");
  }
  return make_dequantize({packed, scales, biases}, bits, dtype, s);
}

}  // namespace

NB_MODULE(_bit_axon_cpu_kernels, m) {
  m.doc() = "Bit-Axon's CPU dequantization kernels (built by bit_axon.quantization.cpu_kernels)";
  m.def("nf4_dequantize", &nf4_dequantize, nb::arg("packed"), nb::arg("scales"), nb::kw_only(),
        nb::arg("dtype") = nb::none(), nb::arg("stream") = nb::none());
  m.def("affine_dequantize", &affine_dequantize, nb::arg("packed"), nb::arg("scales"), nb::arg("biases"),
        nb::arg("bits"), nb::kw_only(), nb::arg("dtype") = nb::none(), nb::arg("stream") = nb::none());
}
