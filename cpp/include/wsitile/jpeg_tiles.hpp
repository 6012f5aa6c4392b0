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

 private:
  std::string path_;
  std::shared_ptr<const JpegTileLayout> layout_;
  const LibJpeg* api_ = nullptr;
  int fd_ = -1;
};

}  // namespace wsitile
