// Tumour labels from a mask image (a TIFF aligned with the slide, tumour = value > 0).
#pragma once

#include <cstdint>

#include "wsitile/slide.hpp"

namespace wsitile {

// For each half-open level-0 rectangle rects[i] = (x0, y0, x1, y1), out[i] = 1 iff the mask's level 0
// has a pixel with a non-zero value there (read at level 0 whatever pyramid the file carries: real mask
// pyramids are not always max-pooled). Reads in blocks of at most 1024x1024 and stops at the first
// tumour pixel. Runs on `threads` threads; the first error is rethrown naming the mask and region.
void mask_any(const Slide& mask, const int64_t* rects, int64_t n, uint8_t* out, int threads);

}  // namespace wsitile
