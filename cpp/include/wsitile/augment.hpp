// Fused augmentation: tf.image / dm-pix colour jitter (brightness, saturation, hue, contrast, clip)
// followed by one of the 8 dihedral orientations, on one uint8 RGB window at a time.
//
// Pure C++17 and thread-safe: the loader's workers call draw_params + augment_image per sample and
// tower. augment_image uses a thread_local scratch buffer (3 float planes of the image, grown on
// demand and then reused), so it allocates nothing per call once a thread has seen its largest window.
#pragma once

#include <cstdint>

namespace wsitile {

// One sample's parameters. Identity = the defaults.
struct AugmentParams {
  int rot90 = 0;           // np.rot90 count over (H, W), 0..3 (counter-clockwise)
  bool flip = false;       // np.fliplr before the rotation
  float brightness = 0;    // additive delta on x = image / 255
  float saturation = 1;    // HSV S multiplier (S clipped to [0, 1])
  float hue = 0;           // added to HSV H modulo 1
  float contrast = 1;      // (x - mean) * contrast + mean, per-channel spatial mean
};

// Random augmentation ranges (defaults: Liu et al. 2017 / the seed project).
struct AugmentConfig {
  bool orientation = true;            // uniformly one of the 8 dihedral transforms
  bool colour = true;
  float brightness = 64.0f / 255.0f;  // delta drawn uniform in [-b, b]
  float saturation_lo = 0.75f, saturation_hi = 1.25f;
  float hue = 0.04f;                  // [-h, h]
  float contrast_lo = 0.25f, contrast_hi = 1.75f;
};

enum class OutDtype {
  kUint8,      // round(x * 255)
  kFloat32,    // x in [0, 1]
  kInception,  // float32 2x - 1 in [-1, 1]
};

// Bytes per output element.
inline int out_itemsize(OutDtype d) { return d == OutDtype::kUint8 ? 1 : 4; }

// Draws a sample's parameters from the counter-based RNG (rng.hpp: hash64(seed, kAugment + k, epoch,
// sample_index), k = 0 orientation, 1 brightness, 2 saturation, 3 hue, 4 contrast). A pure function:
// independent of threads and batch position. Parts switched off give the identity.
AugmentParams draw_params(const AugmentConfig& cfg, uint64_t seed, uint64_t epoch, uint64_t sample_index);

// True when p changes no colour (brightness 0, saturation 1, hue 0, contrast 1): augment_image then
// skips the colour passes (the HSV round trip of in-range values is the identity up to rounding).
bool colour_is_identity(const AugmentParams& p);

// One image (height x width x 3 uint8 RGB, contiguous) -> dst (out dtype, H' x W' x 3 contiguous,
// H' x W' = W x H for odd rot90): colour first, then the orientation. src and dst must not overlap.
// Throws std::invalid_argument for rot90 outside 0..3 or non-positive sizes.
void augment_image(const uint8_t* src, int64_t height, int64_t width, const AugmentParams& p, OutDtype out,
                   void* dst);

// Which build of the kernel this process runs: "avx512", "avx2" (AVX2 + FMA) or "base" (picked once at
// load time from the CPU; the environment variable WSITILE_AUGMENT_ISA=base|avx2|avx512 caps it).
const char* augment_kernel_isa();

// The square window the loader cuts (side x side x 3).
inline void augment_image(const uint8_t* src, int64_t side, const AugmentParams& p, OutDtype out, void* dst) {
  augment_image(src, side, side, p, out, dst);
}

}  // namespace wsitile
