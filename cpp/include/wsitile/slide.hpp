// One whole-slide image, read through libopenslide. Thread-safe: OpenSlide handles may be shared by
// threads, and this class adds no mutable state after construction.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "wsitile/openslide_api.hpp"

namespace wsitile {

// A path that does not exist (Python: FileNotFoundError).
struct FileNotFound : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct LevelInfo {
  int64_t width;
  int64_t height;
  double downsample;  // from the slide; not assumed to be 2^level (real slides have 4.0003)
};

// A size-bounded tile cache that several slides can share (OpenSlide >= 4.0).
class TileCache {
 public:
  explicit TileCache(size_t capacity_bytes);
  ~TileCache();
  TileCache(const TileCache&) = delete;
  TileCache& operator=(const TileCache&) = delete;
  openslide_cache_t* get() const { return cache_; }
  size_t capacity() const { return capacity_; }

 private:
  openslide_cache_t* cache_ = nullptr;
  size_t capacity_;
};

class Slide {
 public:
  // Throws std::invalid_argument (missing file, not a slide) or std::runtime_error (OpenSlide error),
  // always naming the path.
  explicit Slide(std::string path, std::shared_ptr<TileCache> cache = nullptr);
  ~Slide();
  Slide(const Slide&) = delete;
  Slide& operator=(const Slide&) = delete;

  const std::string& path() const { return path_; }
  int32_t level_count() const { return static_cast<int32_t>(levels_.size()); }
  const LevelInfo& level(int32_t level) const;  // throws std::invalid_argument naming the levels that exist
  const std::vector<LevelInfo>& levels() const { return levels_; }
  std::optional<std::string> property(const std::string& name) const;
  std::string vendor() const { return vendor_; }

  // Premultiplied ARGB pixels of a w x h region of `level` whose top-left is (x0, y0) in level-0
  // pixels, as openslide_read_region gives them (transparent outside the slide). Throws
  // std::runtime_error naming the path, level and region when OpenSlide fails (e.g. a corrupt tile);
  // OpenSlide then refuses every later read on this handle, which is what we want.
  void read_argb(int64_t x0, int64_t y0, int32_t level, int64_t w, int64_t h, uint32_t* dest) const;

  // The same region as packed RGB (row stride `row_stride` bytes), pixels outside the slide white and
  // partly transparent pixels composited over white.
  void read_rgb(int64_t x0, int64_t y0, int32_t level, int64_t w, int64_t h, uint8_t* dest,
                int64_t row_stride) const;

 private:
  void check_error(const std::string& what) const;

  std::string path_;
  std::string vendor_;
  const OpenSlideApi* api_;
  openslide_t* osr_ = nullptr;
  std::vector<LevelInfo> levels_;
  std::shared_ptr<TileCache> cache_;  // keeps a shared cache alive as long as the slide
};

// ARGB (premultiplied) -> RGB over white. `n` pixels.
void argb_to_rgb(const uint32_t* src, uint8_t* dst, int64_t n);

}  // namespace wsitile
