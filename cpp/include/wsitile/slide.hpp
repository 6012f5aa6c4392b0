// One whole-slide image, read through libopenslide. Thread-safe: OpenSlide handles may be shared by
// threads, and this class adds no mutable state after construction.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
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

// OpenSlide refused a read (a corrupt or truncated tile, an I/O error). Python: RuntimeError.
struct SlideReadError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The file was deleted or replaced since the slide was opened (Python: wsitile.SlideChangedError, a
// RuntimeError). Pixels read after that may come from either file, so nothing read is trusted.
struct SlideChanged : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// What identifies the file a path named when it was opened: device, inode, size, modification time.
// A replaced file (new inode) or one written in place (new size or mtime) compares unequal.
struct FileIdentity {
  uint64_t dev = 0, ino = 0;
  int64_t size = 0, mtime_ns = 0;
  bool operator==(const FileIdentity& o) const {
    return dev == o.dev && ino == o.ino && size == o.size && mtime_ns == o.mtime_ns;
  }
  bool operator!=(const FileIdentity& o) const { return !(*this == o); }
};

// The identity of the file at `path` now; std::nullopt when it does not exist (or cannot be stat'ed).
std::optional<FileIdentity> file_identity(const std::string& path);
// The same for an open file descriptor (fstat(2)).
std::optional<FileIdentity> file_identity(int fd);

class JpegTileReader;  // jpeg_tiles.hpp
struct JpegTileLayout;
struct JpegTileLevel;

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
  // Throws FileNotFound, std::invalid_argument (not a slide) or std::runtime_error (OpenSlide error),
  // always naming the path. Records the file's identity (see check_unchanged).
  // `jpeg_tiles`: the file's tiled JPEG pages (see jpeg_tiles.hpp), for read_block's direct path;
  // throws SlideChanged when they were parsed from another file than the one opened now.
  explicit Slide(std::string path, std::shared_ptr<TileCache> cache = nullptr,
                 std::shared_ptr<const JpegTileLayout> jpeg_tiles = nullptr);
  ~Slide();
  Slide(const Slide&) = delete;
  Slide& operator=(const Slide&) = delete;

  const std::string& path() const { return path_; }
  int32_t level_count() const { return static_cast<int32_t>(levels_.size()); }
  const LevelInfo& level(int32_t level) const;  // throws std::invalid_argument naming the levels that exist
  const std::vector<LevelInfo>& levels() const { return levels_; }
  std::optional<std::string> property(const std::string& name) const;
  std::string vendor() const { return vendor_; }
  const FileIdentity& identity() const { return identity_; }

  // Throws SlideChanged naming the path when the file at path() is no longer the one opened (deleted,
  // replaced by a rename, or rewritten in place). One stat(2).
  void check_unchanged() const;
  // True once OpenSlide has latched an error on this handle: every later read fails, so a reader that
  // wants to go on needs a new Slide of the same file.
  bool failed() const;

  // Throws std::invalid_argument unless 1 <= w, h, w * h <= 2^32 pixels and |x0|, |y0| <= 2^40 (far
  // beyond any slide; keeps OpenSlide's and our size arithmetic from overflowing).
  static void check_region(int64_t x0, int64_t y0, int64_t w, int64_t h);

  // Premultiplied ARGB pixels of a w x h region of `level` whose top-left is (x0, y0) in level-0
  // pixels, as openslide_read_region gives them (transparent outside the slide). Throws SlideReadError
  // naming the path, level and region when OpenSlide fails (e.g. a corrupt tile), or SlideChanged when
  // the failure comes with a changed file. OpenSlide then refuses every later read on this handle
  // (failed() is true): a caller that wants to go on opens the file again.
  void read_argb(int64_t x0, int64_t y0, int32_t level, int64_t w, int64_t h, uint32_t* dest) const;

  // The same region as packed RGB (row stride `row_stride` bytes), pixels outside the slide white and
  // partly transparent pixels composited over white.
  void read_rgb(int64_t x0, int64_t y0, int32_t level, int64_t w, int64_t h, uint8_t* dest,
                int64_t row_stride) const;

  // The tile edge of `level` when its tiles can be decoded straight from the file (0 otherwise): the
  // level has an integral downsample, one JPEG page of its size, and that page's largest tile (the
  // most detailed) decodes to exactly the pixels read_rgb gives. Decided on the first call per level.
  int32_t jpeg_tile_size(int32_t level) const;

  // The size x size RGB block (bx, by) of `level`: level pixels [bx * size, (bx + 1) * size) x
  // [by * size, ...), outside the slide white. Decoded straight from its JPEG tile when size ==
  // jpeg_tile_size(level) > 0, else read through read_rgb (the level's downsample must then be
  // integral for the block to sit on whole level-0 pixels).
  void read_block(int32_t level, int64_t bx, int64_t by, int64_t size, uint8_t* dest) const;

  // True when jpeg_tile_size(level) > 0 and partial decodes of that level's tiles were checked to
  // give the whole tile's pixels (JpegTileReader::read_tile_region, on the check tile).
  bool jpeg_regions(int32_t level) const;
  // Pixels [x, x + w) x [y, y + h) of read_block(level, bx, by, size)'s block (block coordinates)
  // into dest (row stride `row_stride` bytes): decoding only that part of the tile where
  // jpeg_regions(level) and size == jpeg_tile_size(level), else through the whole block.
  void read_block_region(int32_t level, int64_t bx, int64_t by, int64_t size, int64_t x, int64_t y, int64_t w,
                         int64_t h, uint8_t* dest, int64_t row_stride) const;

  // The whole of `level` as packed RGB (row stride width * 3 bytes): what read_rgb(0, 0, level, width,
  // height) gives. A level whose tiles decode straight from the file (jpeg_tile_size) is decoded tile
  // by tile on `threads` threads; any other level, or one with a tile that fails, through one
  // read_rgb, which names what is wrong. Why: the tissue mask reads a whole ~19 Mpx level per slide,
  // and OpenSlide decodes it on one thread.
  void read_level(int32_t level, uint8_t* dest, int threads) const;

 private:
  void check_error(const std::string& what) const;
  // The verified JPEG page of `level` (jpeg_tile_size's check), or nullptr.
  const JpegTileLevel* jpeg_page(int32_t level) const;

  std::string path_;
  std::string vendor_;
  const OpenSlideApi* api_;
  openslide_t* osr_ = nullptr;
  std::vector<LevelInfo> levels_;
  FileIdentity identity_;
  std::shared_ptr<TileCache> cache_;  // keeps a shared cache alive as long as the slide
  std::unique_ptr<JpegTileReader> jpeg_;  // null: every read goes through OpenSlide
  std::unique_ptr<std::once_flag[]> jpeg_checked_;
  mutable std::vector<const JpegTileLevel*> jpeg_page_;  // per level, set once under jpeg_checked_[level]
  mutable std::vector<uint8_t> jpeg_regions_;            // per level, likewise
};

// ARGB (premultiplied) -> RGB over white. `n` pixels.
void argb_to_rgb(const uint32_t* src, uint8_t* dst, int64_t n);

}  // namespace wsitile
