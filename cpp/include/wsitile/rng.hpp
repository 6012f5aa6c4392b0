// Counter-based randomness: every draw is a pure function of (seed, stream, counter), so what a sample
// gets never depends on thread count, batch position or timing.
#pragma once

#include <cstdint>

namespace wsitile {

// splitmix64's finaliser: a bijective 64-bit mixer with full avalanche.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Uniform 64-bit value keyed by (seed, a, b, c).
inline uint64_t hash64(uint64_t seed, uint64_t a, uint64_t b = 0, uint64_t c = 0) {
  uint64_t h = mix64(seed + 0x9e3779b97f4a7c15ULL);
  h = mix64(h ^ (a + 0x632be59bd9b4e019ULL));
  h = mix64(h ^ (b + 0x8cb92ba72f3d8dd7ULL));
  return mix64(h ^ (c + 0xd6e8feb86659fd93ULL));
}

// Uniform integer in [0, n) from a 64-bit value (Lemire's multiply-high; bias <= n / 2^64).
inline uint64_t bounded(uint64_t r, uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(r) * n) >> 64);
}

// Uniform float in [0, 1) from the top 24 bits.
inline float unit_float(uint64_t r) { return static_cast<float>(r >> 40) * (1.0f / 16777216.0f); }

// Streams: which decision a draw belongs to.
enum RngStream : uint64_t {
  kShuffle = 1,
  kBalancedClass = 2,
  kBalancedPick = 3,
  kAugment = 16,  // + parameter index
};

}  // namespace wsitile
