#include "wsitile/slide.hpp"

#include "wsitile/jpeg_tiles.hpp"
#include "wsitile/parallel.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include <sstream>
#include <stdexcept>
#include <vector>

namespace wsitile {

TileCache::TileCache(size_t capacity_bytes) : capacity_(capacity_bytes) {
  const OpenSlideApi& api = openslide_api();
  if (!api.cache_create) throw std::runtime_error("libopenslide < 4.0 has no shared tile cache");
  cache_ = api.cache_create(capacity_bytes);
}

TileCache::~TileCache() {
  if (cache_) openslide_api().cache_release(cache_);
}

namespace {
FileIdentity identity_of(const struct stat& st) {
  FileIdentity id;
  id.dev = static_cast<uint64_t>(st.st_dev);
  id.ino = static_cast<uint64_t>(st.st_ino);
  id.size = static_cast<int64_t>(st.st_size);
  id.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + static_cast<int64_t>(st.st_mtim.tv_nsec);
  return id;
}
}  // namespace

std::optional<FileIdentity> file_identity(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  return identity_of(st);
}

std::optional<FileIdentity> file_identity(int fd) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return std::nullopt;
  return identity_of(st);
}

namespace {

std::string describe_change(const std::string& path, const FileIdentity& was, const std::optional<FileIdentity>& now) {
  std::ostringstream msg;
  msg << path << ": ";
  if (!now) {
    msg << "the slide file was deleted since it was opened";
  } else {
    msg << "the slide file changed since it was opened (";
    if (now->dev != was.dev || now->ino != was.ino) {
      msg << "replaced: inode " << was.ino << " -> " << now->ino;
    } else if (now->size != was.size) {
      msg << "size " << was.size << " -> " << now->size << " bytes";
    } else {
      msg << "modified: mtime changed";
    }
    msg << ")";
  }
  msg << "; refusing to mix pixels of two files";
  return msg.str();
}

// A copy of the error string OpenSlide latched on a handle. The string is written once, by whichever
// thread's read failed first, and published with an atomic in (uninstrumented) libopenslide, which
// ThreadSanitizer cannot see: scripts/tsan.supp names this function (and nothing else of ours).
__attribute__((noinline)) std::string openslide_error_message(const char* err) { return std::string(err); }

}  // namespace

Slide::Slide(std::string path, std::shared_ptr<TileCache> cache, std::shared_ptr<const JpegTileLayout> jpeg_tiles)
    : path_(std::move(path)), api_(&openslide_api()), cache_(std::move(cache)) {
  // A NUL ends the path for every C API below: "a.tif\0junk" would open a.tif.
  if (path_.find('\0') != std::string::npos) throw std::invalid_argument("slide path contains a NUL byte");
  struct stat st;
  if (::stat(path_.c_str(), &st) != 0) throw FileNotFound(path_ + ": no such file");
  if (S_ISDIR(st.st_mode)) throw std::invalid_argument(path_ + ": is a directory, not a slide");
  // A FIFO or a device would block OpenSlide's open (a FIFO until someone writes to it) or be read
  // for ever: slides are files. (A path swapped for a FIFO between this stat and OpenSlide's open by
  // name can still block: OpenSlide takes no file descriptor.)
  if (!S_ISREG(st.st_mode)) throw std::invalid_argument(path_ + ": not a regular file (a FIFO or a device?), not a slide");
  const std::optional<FileIdentity> before = file_identity(path_);
  if (!before) throw FileNotFound(path_ + ": no such file");
  identity_ = *before;
  const char* vendor = api_->detect_vendor(path_.c_str());
  if (!vendor) throw std::invalid_argument(path_ + ": not a slide OpenSlide can read");
  vendor_ = vendor;
  osr_ = api_->open(path_.c_str());
  if (!osr_) throw std::invalid_argument(path_ + ": not a slide OpenSlide can read");
  try {  // a throwing constructor runs no destructor: close the handle here
    check_error("cannot open slide");
    const int32_t n = api_->get_level_count(osr_);
    check_error("cannot read level count");
    if (n < 1) throw std::runtime_error(path_ + ": slide has no levels");
    for (int32_t l = 0; l < n; ++l) {
      LevelInfo info{};
      api_->get_level_dimensions(osr_, l, &info.width, &info.height);
      info.downsample = api_->get_level_downsample(osr_, l);
      levels_.push_back(info);
    }
    check_error("cannot read level dimensions");
    // A file replaced while OpenSlide parsed it: the levels above may describe either file.
    const std::optional<FileIdentity> after = file_identity(path_);
    if (!after || *after != identity_) throw SlideChanged(describe_change(path_, identity_, after));
  } catch (...) {
    api_->close(osr_);
    osr_ = nullptr;
    throw;
  }
  if (cache_) api_->set_cache(osr_, cache_->get());
  jpeg_checked_.reset(new std::once_flag[levels_.size()]);
  jpeg_page_.assign(levels_.size(), nullptr);
  jpeg_regions_.assign(levels_.size(), 0);
  if (jpeg_tiles) {
    try {
      if (jpeg_tiles->identity != identity_) {
        throw SlideChanged(path_ + ": the slide file changed between reading its tile layout and opening it");
      }
      jpeg_ = std::make_unique<JpegTileReader>(path_, std::move(jpeg_tiles));
    } catch (...) {
      api_->close(osr_);
      osr_ = nullptr;
      throw;
    }
  }
}

Slide::~Slide() {
  if (osr_) api_->close(osr_);
}

const JpegTileLevel* Slide::jpeg_page(int32_t lvl) const {
  const LevelInfo& info = level(lvl);
  if (!jpeg_ || vendor_ != "generic-tiff") return nullptr;  // other vendors' tile semantics are not checked
  std::call_once(jpeg_checked_[lvl], [&] {
    const JpegTileLevel* page = jpeg_->page(info.width, info.height);
    if (!page || info.downsample != std::floor(info.downsample) || page->tile < 16 || page->tile > 4096) return;
    const auto largest = std::max_element(page->bytecounts.begin(), page->bytecounts.end()) - page->bytecounts.begin();
    const int64_t col = largest % page->tiles_across(), row = largest / page->tiles_across(), t = page->tile;
    std::vector<uint8_t> direct(static_cast<size_t>(t * t * 3)), oracle(direct.size());
    try {
      jpeg_->read_tile(*page, col, row, direct.data());
    } catch (const SlideReadError&) {
      return;  // a corrupt check tile: OpenSlide reads this level (and reports the tile when it is read)
    }
    const int64_t x0 = std::llround(static_cast<double>(col * t) * info.downsample);
    const int64_t y0 = std::llround(static_cast<double>(row * t) * info.downsample);
    try {
      read_rgb(x0, y0, lvl, t, t, oracle.data(), t * 3);
    } catch (const SlideReadError&) {
      return;  // OpenSlide cannot read it either: the loader's fault handling takes it from here
    }
    if (direct != oracle) return;
    jpeg_page_[lvl] = page;
    // Partial decodes of the same tile must give the full decode's pixels: regions touching each
    // edge, iMCU-aligned or not, one pixel wide or tall (a libjpeg whose crop or skip differs keeps
    // whole-tile blocks).
    if (!jpeg_->can_read_regions()) return;
    const int64_t regions[][4] = {{1, 1, t - 2, t - 2},           {t / 3 + 1, t / 5 + 3, t / 4 + 1, t / 3 - 1},
                                  {0, 0, t / 7 + 2, t / 9 + 1},   {t - t / 5 - 3, t - t / 4 - 1, t / 5 + 3, t / 4 + 1},
                                  {t / 2 - 1, 0, 1, t},           {0, t / 2 + 1, t, 1}};
    for (const auto& r : regions) {
      std::vector<uint8_t> part(static_cast<size_t>(r[2] * r[3] * 3));
      try {
        jpeg_->read_tile_region(*page, col, row, r[0], r[1], r[2], r[3], part.data(), r[2] * 3);
      } catch (const SlideReadError&) {
        return;
      }
      for (int64_t y = 0; y < r[3]; ++y) {
        if (std::memcmp(part.data() + y * r[2] * 3, direct.data() + ((r[1] + y) * t + r[0]) * 3,
                        static_cast<size_t>(r[2] * 3)) != 0) {
          return;
        }
      }
    }
    jpeg_regions_[lvl] = true;
  });
  return jpeg_page_[lvl];
}

namespace {
// A block wholly outside the level's tiles (the grid's edge windows reach past it): white.
bool outside(const JpegTileLevel& page, int64_t bx, int64_t by) {
  return bx < 0 || by < 0 || bx >= page.tiles_across() || by >= page.tiles_down();
}
}  // namespace

bool Slide::jpeg_regions(int32_t lvl) const { return jpeg_page(lvl) && jpeg_regions_[lvl]; }

void Slide::read_block_region(int32_t lvl, int64_t bx, int64_t by, int64_t size, int64_t x, int64_t y, int64_t w,
                              int64_t h, uint8_t* dest, int64_t row_stride) const {
  const JpegTileLevel* page = jpeg_page(lvl);
  if (!page || !jpeg_regions_[lvl] || size != page->tile) {
    // Not checked on this handle (a fresh one whose check could not run): the whole block, then the part.
    thread_local std::vector<uint8_t> block;
    block.resize(static_cast<size_t>(size * size * 3));
    read_block(lvl, bx, by, size, block.data());
    for (int64_t r = 0; r < h; ++r) {
      std::memcpy(dest + r * row_stride, block.data() + ((y + r) * size + x) * 3, static_cast<size_t>(w * 3));
    }
    return;
  }
  if (outside(*page, bx, by)) {
    for (int64_t r = 0; r < h; ++r) std::memset(dest + r * row_stride, 255, static_cast<size_t>(w * 3));
    return;  // wholly outside the slide: white
  }
  jpeg_->read_tile_region(*page, bx, by, x, y, w, h, dest, row_stride);
}

void Slide::read_level(int32_t lvl, uint8_t* dest, int threads) const {
  const LevelInfo& info = level(lvl);
  const int64_t w = info.width, h = info.height;
  const JpegTileLevel* page = jpeg_page(lvl);  // a page of the level's size, or nullptr
  if (page) {
    const int64_t t = page->tile, across = page->tiles_across();
    try {
      parallel_for(across * page->tiles_down(), threads, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t col = i % across, row = i / across;
          read_block_region(lvl, col, row, t, 0, 0, std::min(t, w - col * t), std::min(t, h - row * t),
                            dest + (row * t * w + col * t) * 3, w * 3);
        }
      });
      return;
    } catch (const SlideReadError&) {
      // A tile that does not decode: OpenSlide reads the level and reports the failure in its words.
    }
  }
  read_rgb(0, 0, lvl, w, h, dest, w * 3);
}

int32_t Slide::jpeg_tile_size(int32_t lvl) const {
  const JpegTileLevel* page = jpeg_page(lvl);
  return page ? page->tile : 0;
}

void Slide::read_block(int32_t lvl, int64_t bx, int64_t by, int64_t size, uint8_t* dest) const {
  const JpegTileLevel* page = jpeg_page(lvl);
  if (page && size == page->tile) {
    if (outside(*page, bx, by)) {
      std::memset(dest, 255, static_cast<size_t>(size * size * 3));  // wholly outside the slide: white
    } else {
      jpeg_->read_tile(*page, bx, by, dest);
    }
    return;
  }
  const double d = level(lvl).downsample;
  read_rgb(std::llround(static_cast<double>(bx * size) * d), std::llround(static_cast<double>(by * size) * d), lvl,
           size, size, dest, size * 3);
}

void Slide::check_unchanged() const {
  const std::optional<FileIdentity> now = file_identity(path_);
  if (!now || *now != identity_) throw SlideChanged(describe_change(path_, identity_, now));
}

bool Slide::failed() const { return api_->get_error(osr_) != nullptr; }

void Slide::check_error(const std::string& what) const {
  const char* err = api_->get_error(osr_);
  if (err) throw std::runtime_error(path_ + ": " + what + ": " + openslide_error_message(err));
}

const LevelInfo& Slide::level(int32_t level) const {
  if (level < 0 || level >= level_count()) {
    std::ostringstream msg;
    msg << path_ << ": level " << level << " out of range (the slide has levels 0.." << level_count() - 1
        << ")";
    throw std::invalid_argument(msg.str());
  }
  return levels_[level];
}

std::optional<std::string> Slide::property(const std::string& name) const {
  const char* v = api_->get_property_value(osr_, name.c_str());
  if (!v) return std::nullopt;
  return std::string(v);
}

void Slide::check_region(int64_t x0, int64_t y0, int64_t w, int64_t h) {
  constexpr int64_t kMaxCoordinate = int64_t{1} << 40, kMaxPixels = int64_t{1} << 32;
  if (w < 1 || h < 1 || w > kMaxPixels || h > kMaxPixels || w * h > kMaxPixels) {
    std::ostringstream msg;
    msg << "region size " << w << "x" << h << " must be positive and at most 2^32 pixels";
    throw std::invalid_argument(msg.str());
  }
  if (x0 < -kMaxCoordinate || x0 > kMaxCoordinate || y0 < -kMaxCoordinate || y0 > kMaxCoordinate) {
    std::ostringstream msg;
    msg << "region location (" << x0 << ", " << y0 << ") beyond +-2^40";
    throw std::invalid_argument(msg.str());
  }
}

void Slide::read_argb(int64_t x0, int64_t y0, int32_t lvl, int64_t w, int64_t h, uint32_t* dest) const {
  level(lvl);  // range check
  check_region(x0, y0, w, h);
  api_->read_region(osr_, dest, x0, y0, lvl, w, h);
  const char* err = api_->get_error(osr_);
  if (err) {
    std::ostringstream msg;
    msg << path_ << ": read failed at level " << lvl << ", level-0 (x, y) = (" << x0 << ", " << y0
        << "), size " << w << "x" << h << ": " << openslide_error_message(err);
    check_unchanged();  // a deleted or replaced file is the better explanation: SlideChanged
    throw SlideReadError(msg.str());
  }
}

void Slide::read_rgb(int64_t x0, int64_t y0, int32_t lvl, int64_t w, int64_t h, uint8_t* dest,
                     int64_t row_stride) const {
  check_region(x0, y0, w, h);
  // Windows and blocks reuse this thread's buffer; a larger read (a whole level for the tissue mask)
  // gets its own, freed on return, so the thread does not keep a level's worth of ARGB (75 MB).
  constexpr int64_t kKeepPixels = int64_t{1} << 20;
  thread_local std::vector<uint32_t> kept;
  std::vector<uint32_t> once;
  std::vector<uint32_t>& buf = w * h <= kKeepPixels ? kept : once;
  buf.resize(static_cast<size_t>(w * h));
  read_argb(x0, y0, lvl, w, h, buf.data());
  for (int64_t r = 0; r < h; ++r) argb_to_rgb(buf.data() + r * w, dest + r * row_stride, w);
}

void argb_to_rgb(const uint32_t* src, uint8_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t p = src[i];
    const uint32_t a = p >> 24;
    // Premultiplied over white: c + (255 - a). Opaque pixels pass through unchanged and fully
    // transparent ones (outside the slide) become white, without a branch.
    const uint32_t add = 255 - a;
    dst[3 * i + 0] = static_cast<uint8_t>(((p >> 16) & 0xff) + add);
    dst[3 * i + 1] = static_cast<uint8_t>(((p >> 8) & 0xff) + add);
    dst[3 * i + 2] = static_cast<uint8_t>((p & 0xff) + add);
  }
}

}  // namespace wsitile
