// Direct decoding of the JPEG tiles of tiled TIFF levels (Camelyon16's .tif, generic tiled TIFF).
//
// Why: OpenSlide's read_region spends most of its time compositing decoded tiles into its ARGB
// output with cairo (openslide #440, #552, #719), several times the JPEG decode itself. For the
// block cache, which reads whole tile-aligned blocks at integral level coordinates, the same pixels
// come straight from libjpeg: read the tile's bytes, feed the level's JPEGTables and the tile to
// libjpeg with OpenSlide's settings (its colour space from the TIFF photometric tag, libjpeg's
// defaults otherwise), and whiten what lies beyond the level's edge. The tile layout (offsets, byte
// counts, tables) comes from tifffile on the Python side; libjpeg is dlopened (the copy Pillow
// ships), never linked. Slide verifies each level against OpenSlide before using it (slide.hpp).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "wsitile/slide.hpp"

namespace wsitile {

// One tiled JPEG TIFF page: a candidate for an OpenSlide level of the same size.
struct JpegTileLevel {
  int64_t width = 0, height = 0;  // page size in pixels
  int32_t tile = 0;               // tile edge (square tiles only)
  bool ycbcr = true;              // Photometric YCbCr (6); else RGB (2)
  std::vector<uint64_t> offsets, bytecounts;  // per tile, row-major; every byte count > 0
  std::vector<uint8_t> tables;                // JPEGTables (may be empty)
  int64_t tiles_across() const { return (width + tile - 1) / tile; }
  int64_t tiles_down() const { return (height + tile - 1) / tile; }
};

// The JPEG pages of one file, and the identity of the file they were parsed from.
struct JpegTileLayout {
  FileIdentity identity;
  std::vector<JpegTileLevel> pages;
};

struct LibJpeg;  // the dlopen'ed functions (jpeg_tiles.cpp)

// Loads libjpeg (6.2 API) from `path`; idempotent for the same path. Throws std::runtime_error naming
// the path, a missing symbol, or a version the vendored headers do not match.
void load_libjpeg(const std::string& path);
bool libjpeg_loaded();

// Reads and decodes tiles of one file through a file descriptor opened once. Thread-safe.
class JpegTileReader {
 public:
  // Opens `path`; throws SlideChanged when the open file is not the one the layout was parsed from.
  JpegTileReader(const std::string& path, std::shared_ptr<const JpegTileLayout> layout);
  ~JpegTileReader();
  JpegTileReader(const JpegTileReader&) = delete;
  JpegTileReader& operator=(const JpegTileReader&) = delete;

  // The page of size width x height, or nullptr (none, or more than one: ambiguous).
  const JpegTileLevel* page(int64_t width, int64_t height) const;

  // Tile (col, row) of `page` as RGB into dst (tile x tile, row stride tile * 3); pixels beyond the
  // page's right or bottom edge are white, as OpenSlide's clipped, transparent edge over white.
  // Throws SlideReadError naming the path, tile and libjpeg's message (corrupt or truncated data;
  // libjpeg's warnings count as errors, as in OpenSlide).
  void read_tile(const JpegTileLevel& page, int64_t col, int64_t row, uint8_t* dst) const;

  // The loaded libjpeg has libjpeg-turbo's partial decoding (jpeg_crop_scanline, jpeg_skip_scanlines).
  bool can_read_regions() const;
  // Pixels [x, x + w) x [y, y + h) of tile (col, row) (tile coordinates, inside the tile) into dst,
  // row stride `stride` bytes: what read_tile gives there, decoding only the iMCU columns and rows
  // the region needs (and one pixel around it). A tile's first read entropy-decodes the rest of it
  // too, so corrupt data anywhere in the tile fails every region as it fails read_tile; later reads
  // of a tile that decoded cleanly stop after their last row. Why: a window cut from
  // a tile that will not be asked for again (shuffled epochs far larger than the block cache) needs
  // a fraction of the tile's IDCT, upsampling and colour conversion, and none of its stores. Slide
  // checks per level that the two agree before the loader uses this. Throws as read_tile.
  void read_tile_region(const JpegTileLevel& page, int64_t col, int64_t row, int64_t x, int64_t y, int64_t w,
                        int64_t h, uint8_t* dst, int64_t stride) const;

 private:
  [[noreturn]] void fail(const JpegTileLevel& page, int64_t col, int64_t row, const std::string& why) const;
  // Decodes [x, x + w) x [y, y + h) of the tile into dst (see decode in jpeg_tiles.cpp; to_end:
  // entropy-decode the rows below too) and marks the tile decoded; throws SlideReadError on failure.
  void decode_part(const JpegTileLevel& page, int64_t col, int64_t row, int64_t x, int64_t y, int64_t w, int64_t h,
                   uint8_t* dst, int64_t stride, bool to_end) const;
  // The tile's compressed bytes (a thread-local buffer, valid until this thread's next call).
  const std::vector<uint8_t>& read_bytes(const JpegTileLevel& page, int64_t col, int64_t row) const;
  // Tiles whose whole entropy-coded data decoded without error (by read_tile, or a region's first read).
  size_t tile_bit(const JpegTileLevel& page, int64_t col, int64_t row) const;
  bool decoded(const JpegTileLevel& page, int64_t col, int64_t row) const;
  void mark_decoded(const JpegTileLevel& page, int64_t col, int64_t row) const;

  std::string path_;
  std::shared_ptr<const JpegTileLayout> layout_;
  const LibJpeg* api_ = nullptr;
  int fd_ = -1;
  std::vector<size_t> first_bit_;                     // per page: its first tile's bit in decoded_
  std::unique_ptr<std::atomic<uint64_t>[]> decoded_;  // one bit per tile of every page
};

}  // namespace wsitile
