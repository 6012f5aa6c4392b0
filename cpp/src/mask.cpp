#include "wsitile/mask.hpp"

#include <algorithm>
#include <vector>

#include "wsitile/parallel.hpp"

namespace wsitile {
namespace {

constexpr int64_t kBlock = 1024;

bool any_nonzero(const Slide& mask, const int64_t* r, std::vector<uint32_t>& buf) {
  for (int64_t by = r[1]; by < r[3]; by += kBlock) {
    for (int64_t bx = r[0]; bx < r[2]; bx += kBlock) {
      const int64_t w = std::min(kBlock, r[2] - bx), h = std::min(kBlock, r[3] - by);
      buf.resize(static_cast<size_t>(w * h));
      mask.read_argb(bx, by, 0, w, h, buf.data());
      // Premultiplied ARGB: a transparent pixel (outside the slide) is 0 in every channel, and any
      // grey or colour value > 0 shows in R, G or B.
      for (uint32_t p : buf) {
        if (p & 0x00ffffffu) return true;
      }
    }
  }
  return false;
}

}  // namespace

void mask_any(const Slide& mask, const int64_t* rects, int64_t n, uint8_t* out, int threads) {
  parallel_for(n, threads, [&](int64_t b, int64_t e) {
    std::vector<uint32_t> buf;
    for (int64_t i = b; i < e; ++i) {
      const int64_t* r = rects + 4 * i;
      out[i] = (r[2] > r[0] && r[3] > r[1] && any_nonzero(mask, r, buf)) ? 1 : 0;
    }
  });
}

}  // namespace wsitile
