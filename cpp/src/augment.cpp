// Fused augmentation kernel (see augment.hpp). Semantics are dm-pix's / tf.image's, step by step:
//   x = image / 255;  x += brightness;  [HSV] S = clip(S * saturation, 0, 1);  [HSV] H = (H + hue) mod 1;
//   x = (x - mean) * contrast + mean (per-channel spatial mean);  clip to [0, 1];
//   np.rot90(np.fliplr(x) if flip else x, rot90).
//
// Layout of the work (one image, three passes over planar float32 data in a thread_local buffer):
//   1. orient (u8 pixels, when rows are not contiguous) + deinterleave + u8 -> float + brightness, writing
//      the planes already in output order
//      (the colour steps are per pixel and the contrast mean is order-free, so orienting first is exact);
//   2. one branch-free HSV pass doing saturation and hue together (one RGB->HSV->RGB round trip instead
//      of dm-pix's two: after the saturation step's HSV->RGB, the hue step's RGB->HSV gives back the same
//      H, S, V up to float rounding, so H + hue can be applied directly; see the note at hsv_pass), also
//      summing each channel per row for the contrast means;
//   3. contrast + clip + interleave + convert to the out dtype, in one loop (the clip folded into the
//      dtype's scale for uint8).
// (2026-12-01, 80 px, one core, random orientations, uint8 out: 3.22 -> 2.51 ns/pixel from three changes,
// A/B in a C++ harness: the orientation copy's loop with its strides in locals (+10%), no division for
// the saturation (see hsv_row, +13%), contrast fused into the interleaving store (+10%). Tried and
// dropped: deinterleaving pass 1 with vpshufb through GCC vector extensions (17 instructions per 8 pixels
// against ~2x for GCC's own loop, yet 5% slower in place).)
// Identity colour parameters skip 2 and 3's arithmetic: a straight oriented copy/convert.
//
// Vectorisation (GCC 12.2, -O3 -fopenmp-simd -fno-trapping-math -ffinite-math-only -fno-signed-zeros, the
// last two so that clips become vmaxps/vminps rather than compare + blend; checked with -fopt-info-vec-all on
// this file and in the disassembly of _core: vdivps/vcvttps2dq on ymm registers in the AVX2 version):
//   the HSV loop in hsv_row (with its simd reduction) and the contrast/clip/interleave loop (store_pass):
//   "loop vectorized using 32 byte vectors" (AVX2 version) and "16 byte vectors" (SSE2 version);
//   pass 1's forward row loop (load_row, stride-3 u8 loads) and
//   the identity copies (copy_row): 32 byte vectors in the AVX2 version (permutes for the stride-3
//   groups). Reversed and transposed rows (flips, odd rot90) are first oriented as u8 pixels into
//   scratch: in the AVX2 version with byte shuffles, 4 pixels (flips) or 4 x 4 (transposes) at a time
//   (0.56 -> 0.24 ns/pixel for the copy, 80 px; 2.64 -> 2.40 ns/pixel for the kernel over random
//   orientations with the source in cache, as in the loader, 3.78 -> 3.12 at 299 px from memory),
//   else one 4-byte move a pixel (orient_scalar; 2 memory ops a pixel instead of the strided float
//   load's 6 plus conversions).
// Without -fno-trapping-math GCC 12 did NOT vectorise the HSV loop ("not vectorized: control flow in
// loop": it may not speculate float ops that can trap, so the selects stay branches) and the kernel
// ran at ~12 ns/pixel instead of ~3 (80 px, float32 out, one core); the flag changes no value. The clip
// in the interleaving loop also needs `#pragma omp simd` (without it: not if-converted).
// The hot entry point is compiled for SSE2, AVX2 + FMA and AVX-512 (see WSITILE_DISPATCH): the wheel
// stays portable and each machine takes the best version it runs, picked once at load time.
#include "wsitile/augment.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "wsitile/rng.hpp"

// GCC on x86-64: the kernel is compiled three times, for the base ISA (SSE2), for AVX2 + FMA (Haswell
// and later, every AMD Zen) and for AVX-512 (F/VL/BW/DQ: Skylake-SP and later, Zen 4), and augment_hot
// picks one at load time. (target_clones cannot combine ISA extensions in one clone; FMA is worth 6-8%
// over AVX2 alone.) Byte shuffles (GCC vector extensions, vpshufb) only in the AVX2/AVX-512 versions.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define WSITILE_DISPATCH 1
#define WSITILE_BYTE_SHUFFLES 1
#else
#define WSITILE_DISPATCH 0
#define WSITILE_BYTE_SHUFFLES 0
#endif
#if defined(__GNUC__)
#define WSITILE_INLINE inline __attribute__((always_inline))
#else
#define WSITILE_INLINE inline
#endif

namespace wsitile {

AugmentParams draw_params(const AugmentConfig& cfg, uint64_t seed, uint64_t epoch, uint64_t sample_index) {
  AugmentParams p;
  auto draw = [&](uint64_t k) { return hash64(seed, kAugment + k, epoch, sample_index); };
  if (cfg.orientation) {
    const uint64_t o = bounded(draw(0), 8);
    p.rot90 = static_cast<int>(o & 3);
    p.flip = (o >> 2) != 0;
  }
  if (cfg.colour) {
    auto uniform = [&](uint64_t k, float lo, float hi) { return lo + (hi - lo) * unit_float(draw(k)); };
    p.brightness = uniform(1, -cfg.brightness, cfg.brightness);
    p.saturation = uniform(2, cfg.saturation_lo, cfg.saturation_hi);
    p.hue = uniform(3, -cfg.hue, cfg.hue);
    p.contrast = uniform(4, cfg.contrast_lo, cfg.contrast_hi);
  }
  return p;
}

bool colour_is_identity(const AugmentParams& p) {
  return p.brightness == 0.0f && p.saturation == 1.0f && p.hue == 0.0f && p.contrast == 1.0f;
}

namespace {

// Source pixel offset of output pixel (oi, oj) = c0 + di * oi + dj * oj (pixels, row-major source).
struct Mapping {
  int64_t out_h, out_w, c0, di, dj;
};

Mapping orientation_mapping(int64_t h, int64_t w, int rot90, bool flip) {
  // Output (oi, oj) -> (si, sj) of m = fliplr(x) if flip else x, for np.rot90(m, k).
  int64_t ai0, aii, aij, bj0, bji, bjj, oh, ow;  // si = ai0 + aii*oi + aij*oj; sj = bj0 + bji*oi + bjj*oj
  switch (rot90) {
    case 0: ai0 = 0, aii = 1, aij = 0, bj0 = 0, bji = 0, bjj = 1, oh = h, ow = w; break;
    case 1: ai0 = 0, aii = 0, aij = 1, bj0 = w - 1, bji = -1, bjj = 0, oh = w, ow = h; break;
    case 2: ai0 = h - 1, aii = -1, aij = 0, bj0 = w - 1, bji = 0, bjj = -1, oh = h, ow = w; break;
    default: ai0 = h - 1, aii = 0, aij = -1, bj0 = 0, bji = 1, bjj = 0, oh = w, ow = h; break;
  }
  if (flip) bj0 = w - 1 - bj0, bji = -bji, bjj = -bjj;  // m[i, j] = x[i, w - 1 - j]
  return {oh, ow, ai0 * w + bj0, aii * w + bji, aij * w + bjj};
}

// Pass 1 for one output row: n contiguous pixels from src (interleaved u8) -> planes.
WSITILE_INLINE void load_row(const uint8_t* __restrict s, int64_t n, float k, float b, float* __restrict r,
                             float* __restrict g, float* __restrict bl) {
  for (int64_t j = 0; j < n; ++j) {  // vectorises (stride-3 loads via permutes)
    r[j] = static_cast<float>(s[3 * j]) * k + b;
    g[j] = static_cast<float>(s[3 * j + 1]) * k + b;
    bl[j] = static_cast<float>(s[3 * j + 2]) * k + b;
  }
}

// Pass 2: saturation and hue on one row of planes, in place; adds the row's channel sums.
//
// dm-pix applies adjust_saturation (RGB->HSV, S = clip(S*f, 0, 1), HSV->RGB) and then adjust_hue
// (RGB->HSV, H = (H + d) mod 1, HSV->RGB). The HSV->RGB of the first step has max channel V and min
// channel V(1 - S) exactly (one of dr/dg/db is 1 and one is 0), so the second RGB->HSV returns V, S and
// H again up to rounding; where S = 0 (including V <= 0, where dm-pix sets S = 0) H has no effect.
// So one round trip with (H + d, clip(S*f), V) equals the two (checked against dm-pix in the tests).
// Values outside [0, 1] after brightness follow dm-pix's formulas unchanged (S = range / V may exceed
// 1 before the clip; V <= 0 gives S = 0, i.e. grey V).
WSITILE_INLINE void hsv_row(float* __restrict r, float* __restrict g, float* __restrict b, int64_t n, float sat,
                            float hue, double* sums) {
  float sr = 0.0f, sg = 0.0f, sb = 0.0f;
#pragma omp simd reduction(+ : sr, sg, sb)
  for (int64_t j = 0; j < n; ++j) {
    const float R = r[j], G = g[j], B = b[j];
    const float v = std::max(std::max(R, G), B);
    const float mn = std::min(std::min(R, G), B);
    const float range = v - mn;
    const float safe_range = range > 0.0f ? range : 1.0f;
    const float norm = 1.0f / (6.0f * safe_range);
    float h = v == G ? norm * (B - R) + 2.0f / 6.0f : norm * (R - G) + 4.0f / 6.0f;
    h = v == R ? norm * (G - B) : h;
    h = (range > 0.0f ? h : 0.0f) + (h < 0.0f ? 1.0f : 0.0f);
    // saturation: with s = range / v (0 where v <= 0) and s' = clip(s * sat, 0, 1), the colour below is
    // v * (1 - s' + s' * d) = v - c * (1 - d) for c = v * s' = min(range * sat, max(v, 0)) (sat >= 0):
    // no division for s.
    // (Ternaries, not std::min(.., std::max(v, 0.0f)): GCC 12 left the whole loop scalar with those.)
    const float vpos = v > 0.0f ? v : 0.0f, rs = range * sat;
    const float c = rs < vpos ? rs : vpos;
    // hue: (h + d) mod 1 with truncation (h + d is in [-0.5, 1.5) for validated d; works for any |d| < 2^31)
    float t = h + hue;
    t = t - static_cast<float>(static_cast<int32_t>(t));
    t = t + (t < 0.0f ? 1.0f : 0.0f);
    const float dh = t * 6.0f;  // dh == 6 gives the same colour as 0, as in dm-pix
    // 1 - d for dm-pix's d_r = clip(|dh - 3| - 1), d_g = clip(2 - |dh - 2|), d_b = clip(2 - |dh - 4|)
    const float er = std::min(std::max(2.0f - std::fabs(dh - 3.0f), 0.0f), 1.0f);
    const float eg = std::min(std::max(std::fabs(dh - 2.0f) - 1.0f, 0.0f), 1.0f);
    const float eb = std::min(std::max(std::fabs(dh - 4.0f) - 1.0f, 0.0f), 1.0f);
    const float R2 = v - c * er, G2 = v - c * eg, B2 = v - c * eb;
    r[j] = R2;
    g[j] = G2;
    b[j] = B2;
    sr += R2;
    sg += G2;
    sb += B2;
  }
  sums[0] += sr;
  sums[1] += sg;
  sums[2] += sb;
}

// Pass 3: contrast, clip and the out dtype, interleaving: y = clip(x * c + m * (1 - c), 0, 1) per channel,
// folded with the dtype's scale: u8 = trunc(clip(x * 255c + 255m(1 - c) + 0.5, 0.5, 255.5)) (round half up;
// np.round's half-to-even differs only on exact .5 ties), float = clip(...) * scale + shift.
struct Affine {
  float mul[3], add[3];
};

WSITILE_INLINE float clamp(float x, float lo, float hi) { return std::min(std::max(x, lo), hi); }

template <OutDtype D>
WSITILE_INLINE void store_pass(const float* __restrict r, const float* __restrict g, const float* __restrict b,
                               int64_t n, const Affine& a, void* dst) {
  const float mr = a.mul[0], mg = a.mul[1], mb = a.mul[2], ar = a.add[0], ag = a.add[1], ab = a.add[2];
  if constexpr (D == OutDtype::kUint8) {
    uint8_t* __restrict o = static_cast<uint8_t*>(dst);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      o[3 * j] = static_cast<uint8_t>(static_cast<int32_t>(clamp(r[j] * mr + ar, 0.5f, 255.5f)));
      o[3 * j + 1] = static_cast<uint8_t>(static_cast<int32_t>(clamp(g[j] * mg + ag, 0.5f, 255.5f)));
      o[3 * j + 2] = static_cast<uint8_t>(static_cast<int32_t>(clamp(b[j] * mb + ab, 0.5f, 255.5f)));
    }
  } else {
    const float scale = D == OutDtype::kInception ? 2.0f : 1.0f;
    const float shift = D == OutDtype::kInception ? -1.0f : 0.0f;
    float* __restrict o = static_cast<float*>(dst);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      o[3 * j] = clamp(r[j] * mr + ar, 0.0f, 1.0f) * scale + shift;
      o[3 * j + 1] = clamp(g[j] * mg + ag, 0.0f, 1.0f) * scale + shift;
      o[3 * j + 2] = clamp(b[j] * mb + ab, 0.0f, 1.0f) * scale + shift;
    }
  }
}

// Identity colour: oriented copy + convert, no scratch.
template <OutDtype D>
WSITILE_INLINE void copy_row(const uint8_t* __restrict s, int64_t step, int64_t n, void* dst) {
  if constexpr (D == OutDtype::kUint8) {
    uint8_t* __restrict o = static_cast<uint8_t*>(dst);
    if (step == 1) {
      std::memcpy(o, s, static_cast<size_t>(3 * n));
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const uint8_t* p = s + 3 * step * j;
        o[3 * j] = p[0];
        o[3 * j + 1] = p[1];
        o[3 * j + 2] = p[2];
      }
    }
  } else {
    // [-1, 1] as (2x - 255) / 255, not 2x/255 - 1: with FMA the latter gives 1.0000001 at x = 255.
    const float scale = D == OutDtype::kInception ? 2.0f : 1.0f;
    const float shift = D == OutDtype::kInception ? -255.0f : 0.0f;
    const float k = 1.0f / 255.0f;
    float* __restrict o = static_cast<float*>(dst);
    if (step == 1) {
      for (int64_t j = 0; j < 3 * n; ++j) o[j] = (static_cast<float>(s[j]) * scale + shift) * k;
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const uint8_t* p = s + 3 * step * j;
        o[3 * j] = (static_cast<float>(p[0]) * scale + shift) * k;
        o[3 * j + 1] = (static_cast<float>(p[1]) * scale + shift) * k;
        o[3 * j + 2] = (static_cast<float>(p[2]) * scale + shift) * k;
      }
    }
  }
}

// Any orientation, one 4-byte move a pixel: the 4th byte read is the next source pixel's (never past
// the image: the last pixel in memory takes 3 single bytes), the 4th written is overwritten by the
// next output pixel or lands in the slack after the 3n bytes (the region holds 4n).
WSITILE_INLINE void orient_scalar(const uint8_t* __restrict src, int64_t n, const Mapping& mp, uint8_t* __restrict out) {
  const int64_t oh = mp.out_h, ow = mp.out_w;
  const uint8_t* last = src + 3 * (n - 1);
  const int64_t step = 3 * mp.dj, row_step = 3 * mp.di;  // locals: the u8 stores could alias mp
  const uint8_t* s = src + 3 * mp.c0;
  uint8_t* o = out;
  for (int64_t i = 0; i < oh; ++i, s += row_step) {
    const uint8_t* q = s;
    // The row that holds the image's last pixel in memory copies it by bytes, the rest by 4-byte moves.
    const bool tail = (last - s) % step == 0 && (last - s) / step >= 0 && (last - s) / step < ow;
    const int64_t fast = tail ? (last - s) / step : ow;
    int64_t j = 0;
    for (; j < fast; ++j, q += step, o += 3) std::memcpy(o, q, 4);
    if (tail) {
      o[0] = q[0], o[1] = q[1], o[2] = q[2];
      for (++j, q += step, o += 3; j < ow; ++j, q += step, o += 3) std::memcpy(o, q, 4);
    }
  }
}

#if WSITILE_BYTE_SHUFFLES
// Transposed orientations (odd rot90): output pixel (i, j) is source pixel c0 + di * i + dj * j with
// di = +-1, dj = +-width, so output rows i..i+3 at column j come from 4 consecutive source pixels
// (forwards or backwards) of source row j. Blocks of 4 x 4 pixels: 4 16-byte loads (12 bytes used),
// 8 byte shuffles (vpshufb pairs through GCC vector extensions), 4 12-byte stores; edges and blocks
// whose load would read past the image take 3-byte copies.
typedef uint8_t u8x16 __attribute__((vector_size(16)));

template <int DI>
WSITILE_INLINE void transpose_pixels(const uint8_t* __restrict src, int64_t n, const Mapping& mp,
                                     uint8_t* __restrict out) {
  const int64_t oh = mp.out_h, ow = mp.out_w, c0 = mp.c0, dj = mp.dj;
  const uint8_t* end = src + 3 * n;
  // Byte offset of pixel a (0..3) of a block column within its 16-byte load (which starts at the
  // lowest address: pixel 0 forwards, pixel 3 backwards).
  constexpr int P0 = DI > 0 ? 0 : 9, P1 = DI > 0 ? 3 : 6, P2 = DI > 0 ? 6 : 3, P3 = DI > 0 ? 9 : 0;
  constexpr u8x16 lo = {P0, P0 + 1, P0 + 2, 16 + P0, 17 + P0, 18 + P0, P1, P1 + 1, P1 + 2, 16 + P1, 17 + P1, 18 + P1, 0, 0, 0, 0};
  constexpr u8x16 hi = {P2, P2 + 1, P2 + 2, 16 + P2, 17 + P2, 18 + P2, P3, P3 + 1, P3 + 2, 16 + P3, 17 + P3, 18 + P3, 0, 0, 0, 0};
  constexpr u8x16 first = {0, 1, 2, 3, 4, 5, 16, 17, 18, 19, 20, 21, 0, 0, 0, 0};
  constexpr u8x16 second = {6, 7, 8, 9, 10, 11, 22, 23, 24, 25, 26, 27, 0, 0, 0, 0};
  auto pixel3 = [&](int64_t i, int64_t j) { std::memcpy(out + 3 * (i * ow + j), src + 3 * (c0 + DI * i + dj * j), 3); };
  auto store12 = [](uint8_t* o, u8x16 v) { std::memcpy(o, &v, 12); };
  const int64_t oh4 = oh & ~int64_t{3}, ow4 = ow & ~int64_t{3};
  for (int64_t i = 0; i < oh4; i += 4) {
    for (int64_t j = 0; j < ow4; j += 4) {
      const uint8_t* q[4];
      bool inside = true;
      for (int b = 0; b < 4; ++b) {
        q[b] = src + 3 * (c0 + DI * (DI > 0 ? i : i + 3) + dj * (j + b));
        inside = inside && q[b] + 16 <= end;
      }
      if (!inside) {
        for (int64_t a = 0; a < 4; ++a)
          for (int64_t b = 0; b < 4; ++b) pixel3(i + a, j + b);
        continue;
      }
      u8x16 v[4];
      for (int b = 0; b < 4; ++b) std::memcpy(&v[b], q[b], 16);
      const u8x16 t01 = __builtin_shuffle(v[0], v[1], lo), t01b = __builtin_shuffle(v[0], v[1], hi);
      const u8x16 t23 = __builtin_shuffle(v[2], v[3], lo), t23b = __builtin_shuffle(v[2], v[3], hi);
      uint8_t* o = out + 3 * (i * ow + j);
      store12(o, __builtin_shuffle(t01, t23, first));
      store12(o + 3 * ow, __builtin_shuffle(t01, t23, second));
      store12(o + 6 * ow, __builtin_shuffle(t01b, t23b, first));
      store12(o + 9 * ow, __builtin_shuffle(t01b, t23b, second));
    }
    for (int64_t a = 0; a < 4; ++a)
      for (int64_t j = ow4; j < ow; ++j) pixel3(i + a, j);
  }
  for (int64_t i = oh4; i < oh; ++i)
    for (int64_t j = 0; j < ow; ++j) pixel3(i, j);
}

// Flips (even rot90 with a flip, rot90 = 2): every output row is a source row backwards (dj = -1).
// Four pixels at a time: one 16-byte load from the lowest of them, one byte shuffle, a 12-byte store.
WSITILE_INLINE void reverse_rows(const uint8_t* __restrict src, int64_t n, const Mapping& mp, uint8_t* __restrict out) {
  const int64_t oh = mp.out_h, ow = mp.out_w;
  const uint8_t* end = src + 3 * n;
  constexpr u8x16 reverse = {9, 10, 11, 6, 7, 8, 3, 4, 5, 0, 1, 2, 0, 0, 0, 0};
  for (int64_t i = 0; i < oh; ++i) {
    const uint8_t* row = src + 3 * (mp.c0 + mp.di * i);  // output pixel j is row - 3j
    uint8_t* o = out + 3 * ow * i;
    int64_t j = 0;
    for (; j + 4 <= ow && row - 3 * (j + 3) + 16 <= end; j += 4) {
      u8x16 v;
      std::memcpy(&v, row - 3 * (j + 3), 16);
      v = __builtin_shuffle(v, reverse);
      std::memcpy(o + 3 * j, &v, 12);
    }
    for (; j < ow; ++j) std::memcpy(o + 3 * j, row - 3 * j, 3);
  }
}

#endif

template <OutDtype D, bool kShuffles>
WSITILE_INLINE void run(const uint8_t* src, const Mapping& mp, const AugmentParams& p, void* dst,
                        float* planes) {
  const int64_t oh = mp.out_h, ow = mp.out_w, n = oh * ow;
  const int64_t item = 3 * out_itemsize(D);
  if (colour_is_identity(p)) {
    for (int64_t i = 0; i < oh; ++i)
      copy_row<D>(src + 3 * (mp.c0 + mp.di * i), mp.dj, ow, static_cast<char*>(dst) + item * ow * i);
    return;
  }
  float* R = planes;
  float* G = planes + n;
  float* B = planes + 2 * n;
  Mapping m = mp;
  if (mp.dj != 1) {
    // Flipped or transposed rows: orient the u8 pixels first (into L1), so that the float load below
    // always runs its vectorised contiguous form instead of strided scalar loads.
    uint8_t* oriented = reinterpret_cast<uint8_t*>(planes + 3 * n);
#if WSITILE_BYTE_SHUFFLES
    // Only in the AVX2 version: SSE2 has no pshufb, and GCC's generic lowering of the shuffles was 28%
    // slower there than the scalar copy below.
    // (WSITILE_SCALAR_ORIENT in the environment forces the scalar copy: tests compare the two paths.)
    static const bool shuffles = kShuffles && !std::getenv("WSITILE_SCALAR_ORIENT");
    if (shuffles && (mp.di == 1 || mp.di == -1)) {
      mp.di == 1 ? transpose_pixels<1>(src, n, mp, oriented) : transpose_pixels<-1>(src, n, mp, oriented);
    } else if (shuffles && mp.dj == -1) {
      reverse_rows(src, n, mp, oriented);
    } else
#endif
    {
      orient_scalar(src, n, mp, oriented);
    }
    src = oriented;
    m = {oh, ow, 0, ow, 1};
  }
  const float k = 1.0f / 255.0f;
  double sums[3] = {0.0, 0.0, 0.0};
  for (int64_t i = 0; i < oh; ++i) {
    float* r = R + ow * i;
    float* g = G + ow * i;
    float* b = B + ow * i;
    load_row(src + 3 * (m.c0 + m.di * i), ow, k, p.brightness, r, g, b);
    hsv_row(r, g, b, ow, p.saturation, p.hue, sums);  // row still in L1
  }
  Affine a;
  for (int c = 0; c < 3; ++c) {
    const float m = static_cast<float>(sums[c] / static_cast<double>(n));
    const float k = D == OutDtype::kUint8 ? 255.0f : 1.0f;
    a.mul[c] = p.contrast * k;
    a.add[c] = (m - p.contrast * m) * k + (D == OutDtype::kUint8 ? 0.5f : 0.0f);
  }
  store_pass<D>(R, G, B, n, a, dst);
}

#define WSITILE_AUGMENT_HOT(NAME, SHUFFLES)                                                                   \
  void NAME(const uint8_t* src, const Mapping& mp, const AugmentParams& p, OutDtype out, void* dst, float* planes) { \
    switch (out) {                                                                                            \
      case OutDtype::kUint8: run<OutDtype::kUint8, SHUFFLES>(src, mp, p, dst, planes); break;                 \
      case OutDtype::kFloat32: run<OutDtype::kFloat32, SHUFFLES>(src, mp, p, dst, planes); break;             \
      case OutDtype::kInception: run<OutDtype::kInception, SHUFFLES>(src, mp, p, dst, planes); break;         \
    }                                                                                                         \
  }

WSITILE_AUGMENT_HOT(augment_base, false)
#if WSITILE_DISPATCH
__attribute__((target("avx2,fma"))) WSITILE_AUGMENT_HOT(augment_avx2_fma, true)
// AVX-512 at 256-bit width: 32 vector registers (the HSV loop's constants no longer spill) and mask
// registers for its selects; 2.31 -> 2.07 ns/pixel against the AVX2 build (80 px, random orientations,
// this machine's Zen 4). 512-bit vectors gave 1.98 but lower the clock of older Xeons (Skylake-SP,
// Cascade Lake: common GPU-cluster hosts) for everything on that core, the JPEG decoding included.
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=256")))
WSITILE_AUGMENT_HOT(augment_avx512, true)

using HotFn = void (*)(const uint8_t*, const Mapping&, const AugmentParams&, OutDtype, void*, float*);

// The best version this CPU runs; WSITILE_AUGMENT_ISA=base|avx2|avx512 caps it (tests compare them).
std::pair<HotFn, const char*> pick_augment_kernel() {
  __builtin_cpu_init();  // this initialiser may run before libgcc's own CPU detection
  const char* cap = std::getenv("WSITILE_AUGMENT_ISA");
  const std::string want = cap ? cap : "avx512";
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  if (avx512 && want == "avx512") return {augment_avx512, "avx512"};
  if (avx2 && want != "base") return {augment_avx2_fma, "avx2"};
  return {augment_base, "base"};
}
const std::pair<HotFn, const char*> augment_kernel = pick_augment_kernel();
const HotFn augment_hot = augment_kernel.first;
#else
constexpr auto augment_hot = augment_base;
#endif

}  // namespace

const char* augment_kernel_isa() {
#if WSITILE_DISPATCH
  return augment_kernel.second;
#else
  return "base";
#endif
}

void augment_image(const uint8_t* src, int64_t height, int64_t width, const AugmentParams& p, OutDtype out,
                   void* dst) {
  if (p.rot90 < 0 || p.rot90 > 3) throw std::invalid_argument("rot90 must be in 0..3, got " + std::to_string(p.rot90));
  if (height <= 0 || width <= 0) {
    throw std::invalid_argument("image size must be positive, got " + std::to_string(height) + " x " +
                                std::to_string(width));
  }
  const Mapping mp = orientation_mapping(height, width, p.rot90, p.flip);
  float* planes = nullptr;
  if (!colour_is_identity(p)) {
    thread_local std::vector<float> scratch;
    // Three float planes, then room for the oriented u8 copy (3 bytes a pixel: one more float plane).
    const size_t need = static_cast<size_t>(4 * height * width);
    if (scratch.size() < need) scratch.resize(need);
    planes = scratch.data();
  }
  augment_hot(src, mp, p, out, dst, planes);
}

}  // namespace wsitile
