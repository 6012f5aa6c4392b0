#include "wsitile/jpeg_tiles.hpp"

#include <dlfcn.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <sstream>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <utility>

// The libjpeg 6.2 API declarations only (vendored, cpp/third_party/libjpeg-turbo): every function is
// called through a pointer resolved with dlsym, so nothing here links libjpeg.
#include <jpeglib.h>

namespace wsitile {

struct LibJpeg {
  std::string path;
  jpeg_error_mgr* (*std_error)(jpeg_error_mgr*) = nullptr;
  void (*create_decompress)(j_decompress_ptr, int, size_t) = nullptr;
  void (*destroy_decompress)(j_decompress_ptr) = nullptr;
  void (*abort_decompress)(j_decompress_ptr) = nullptr;
  void (*mem_src)(j_decompress_ptr, const unsigned char*, unsigned long) = nullptr;
  int (*read_header)(j_decompress_ptr, boolean) = nullptr;
  boolean (*start_decompress)(j_decompress_ptr) = nullptr;
  JDIMENSION (*read_scanlines)(j_decompress_ptr, JSAMPARRAY, JDIMENSION) = nullptr;
  // libjpeg-turbo's partial decoding (1.5+); null in a libjpeg without it: regions are then off.
  JDIMENSION (*skip_scanlines)(j_decompress_ptr, JDIMENSION) = nullptr;
  void (*crop_scanline)(j_decompress_ptr, JDIMENSION*, JDIMENSION*) = nullptr;
};

namespace {

std::mutex g_load_mu;
const LibJpeg* g_lib = nullptr;  // set once under g_load_mu, never freed (dlopen'd for the process)

const LibJpeg& lib() {
  std::lock_guard<std::mutex> lock(g_load_mu);
  if (!g_lib) throw std::runtime_error("libjpeg is not loaded (wsitile._core.load_libjpeg)");
  return *g_lib;
}

// libjpeg reports errors through error_exit, which must not return: jump back to the decode call.
// Warnings (corrupt data that libjpeg would paper over) are errors too, as in OpenSlide.
struct ErrorMgr {
  jpeg_error_mgr base;
  jmp_buf env;
  char message[JMSG_LENGTH_MAX];
};

extern "C" void on_error_exit(j_common_ptr cinfo) {
  ErrorMgr* err = reinterpret_cast<ErrorMgr*>(cinfo->err);
  err->base.format_message(cinfo, err->message);
  longjmp(err->env, 1);
}

extern "C" void on_emit_message(j_common_ptr cinfo, int msg_level) {
  if (msg_level < 0) on_error_exit(cinfo);
}

// A decompressor and its error handler.
struct Decoder {
  jpeg_decompress_struct cinfo;
  ErrorMgr err;
  bool created = false;
  ~Decoder() {
    if (created) g_lib->destroy_decompress(&cinfo);
  }
};

bool create(Decoder& d, const LibJpeg& api) {
  d.cinfo.err = api.std_error(&d.err.base);
  d.err.base.error_exit = on_error_exit;
  d.err.base.emit_message = on_emit_message;
  if (setjmp(d.err.env)) return false;
  api.create_decompress(&d.cinfo, JPEG_LIB_VERSION, sizeof(jpeg_decompress_struct));
  d.created = true;
  return true;
}

constexpr uint32_t kRegionRows = 16;  // rows decode hands libjpeg per call

// This thread's rows for the parts of decoded rows that do not go straight into the destination.
uint8_t* region_scratch(int64_t tile) {
  thread_local std::vector<uint8_t> scratch;
  scratch.resize(static_cast<size_t>(kRegionRows) * static_cast<size_t>(tile) * 3);
  return scratch.data();
}

// Reads the tables and the tile's header and starts decompression with OpenSlide's settings: the
// colour space the TIFF photometric tag names, libjpeg's defaults otherwise (islow IDCT, fancy
// upsampling). False with err.message set when the tile is not a tile x tile RGB image. Must be
// called under the caller's setjmp.
bool start(Decoder& d, const LibJpeg& api, const uint8_t* tables, size_t tables_len, const uint8_t* data, size_t len,
           bool ycbcr, int32_t tile) {
  jpeg_decompress_struct* cinfo = &d.cinfo;
  if (tables_len > 0) {
    api.mem_src(cinfo, tables, static_cast<unsigned long>(tables_len));
    if (api.read_header(cinfo, FALSE) != JPEG_HEADER_TABLES_ONLY) {
      std::snprintf(d.err.message, sizeof d.err.message, "cannot load the JPEGTables");
      return false;
    }
  }
  api.mem_src(cinfo, data, static_cast<unsigned long>(len));
  if (api.read_header(cinfo, TRUE) != JPEG_HEADER_OK) {
    std::snprintf(d.err.message, sizeof d.err.message, "cannot read the JPEG header");
    return false;
  }
  cinfo->jpeg_color_space = ycbcr ? JCS_YCbCr : JCS_RGB;
  cinfo->out_color_space = JCS_RGB;
  api.start_decompress(cinfo);
  if (cinfo->output_width != static_cast<JDIMENSION>(tile) || cinfo->output_height != static_cast<JDIMENSION>(tile) ||
      cinfo->output_components != 3) {
    std::snprintf(d.err.message, sizeof d.err.message, "JPEG is %ux%u with %d components, expected %dx%d RGB",
                  cinfo->output_width, cinfo->output_height, cinfo->output_components, tile, tile);
    return false;
  }
  return true;
}

// The tile's pixels [x, x + w) x [y, y + h) into dst (row stride `stride` bytes), decoding only the
// iMCU columns that cover them (jpeg_crop_scanline) and skipping the rows above them
// (jpeg_skip_scanlines: entropy decoding only, no IDCT, upsampling or colour conversion); with
// `to_end` the rows below are entropy-decoded too, else decoding stops after the last row. The
// decoded span reaches one pixel beyond the region on each side where the tile allows (then out to
// the iMCU columns holding it). Why: at a crop's edge libjpeg's fancy upsampling replicates the edge
// chroma sample where a full decode has its neighbour, so the crop's outermost columns differ (seen:
// 390 of 1,920 random regions without the margin, none with it); rows below a skip come out exact in
// libjpeg-turbo and get the same one-row margin for other versions. Slide checks per level that
// regions equal the full decode before the loader uses them. Rows whose decoded span is exactly the
// region (the whole tile: read_tile) go straight into dst, others through `scratch` (kRegionRows rows
// of the span). Returns false with err.message set on failure. No object with a destructor lives in
// this frame: longjmp may leave it.
bool decode(Decoder& d, const LibJpeg& api, const uint8_t* tables, size_t tables_len, const uint8_t* data,
            size_t len, bool ycbcr, int32_t tile, int64_t x, int64_t y, int64_t w, int64_t h, uint8_t* dst,
            int64_t stride, uint8_t* scratch, bool to_end) {
  jpeg_decompress_struct* cinfo = &d.cinfo;
  if (setjmp(d.err.env)) {  // setjmp stands alone in its condition, as the C standard asks
    api.abort_decompress(cinfo);
    return false;
  }
  if (!start(d, api, tables, tables_len, data, len, ycbcr, tile)) {
    api.abort_decompress(cinfo);
    return false;
  }
  JDIMENSION x_lo = static_cast<JDIMENSION>(std::max<int64_t>(0, x - 1));
  JDIMENSION span = static_cast<JDIMENSION>(std::min<int64_t>(tile, x + w + 1)) - x_lo;
  if (span < static_cast<JDIMENSION>(tile)) api.crop_scanline(cinfo, &x_lo, &span);  // x_lo moves down to an iMCU
  const JDIMENSION y_lo = static_cast<JDIMENSION>(std::max<int64_t>(0, y - 1));
  if (y_lo > 0) api.skip_scanlines(cinfo, y_lo);
  const JDIMENSION y_end = static_cast<JDIMENSION>(y + h);
  const size_t left = static_cast<size_t>(x - x_lo) * 3, bytes = static_cast<size_t>(w) * 3;
  const bool exact_span = left == 0 && static_cast<int64_t>(span) == w;
  JSAMPROW rows[kRegionRows];
  while (cinfo->output_scanline < y_end) {
    const JDIMENSION first = cinfo->output_scanline;
    const JDIMENSION n = std::min<JDIMENSION>(kRegionRows, y_end - first);
    for (JDIMENSION i = 0; i < n; ++i) {
      const int64_t r = static_cast<int64_t>(first + i);
      rows[i] = exact_span && r >= y ? dst + (r - y) * stride : scratch + static_cast<size_t>(i) * span * 3;
    }
    const JDIMENSION got = api.read_scanlines(cinfo, rows, n);
    for (JDIMENSION i = 0; i < got; ++i) {
      const int64_t r = static_cast<int64_t>(first + i);
      if (r >= y && !exact_span) std::memcpy(dst + (r - y) * stride, rows[i] + left, bytes);
    }
  }
  // to_end: the rows below are entropy-decoded too (libjpeg-turbo's skip to the very end decodes
  // nothing, so skip to the last row and read that one), which is where corrupt data shows.
  if (to_end && cinfo->output_scanline + 1 < cinfo->output_height) {
    api.skip_scanlines(cinfo, cinfo->output_height - cinfo->output_scanline - 1);
  }
  if (to_end && cinfo->output_scanline < cinfo->output_height) {
    rows[0] = scratch;
    api.read_scanlines(cinfo, rows, 1);
  }
  api.abort_decompress(cinfo);
  return true;
}

}  // namespace

void load_libjpeg(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_load_mu);
  if (g_lib) {
    if (g_lib->path == path) return;
    throw std::runtime_error("libjpeg already loaded from " + g_lib->path + "; cannot switch to " + path);
  }
  void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    const char* e = ::dlerror();
    throw std::runtime_error("cannot load libjpeg from " + path + ": " + (e ? e : "unknown error"));
  }
  auto lj = std::make_unique<LibJpeg>();
  lj->path = path;
  auto resolve = [&](auto& fn, const char* name) {
    void* sym = ::dlsym(handle, name);
    if (!sym) {
      ::dlclose(handle);
      throw std::runtime_error(path + ": libjpeg symbol " + name + " not found");
    }
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(sym);
  };
  resolve(lj->std_error, "jpeg_std_error");
  resolve(lj->create_decompress, "jpeg_CreateDecompress");
  resolve(lj->destroy_decompress, "jpeg_destroy_decompress");
  resolve(lj->abort_decompress, "jpeg_abort_decompress");
  resolve(lj->mem_src, "jpeg_mem_src");
  resolve(lj->read_header, "jpeg_read_header");
  resolve(lj->start_decompress, "jpeg_start_decompress");
  resolve(lj->read_scanlines, "jpeg_read_scanlines");
  lj->skip_scanlines = reinterpret_cast<decltype(lj->skip_scanlines)>(::dlsym(handle, "jpeg_skip_scanlines"));
  lj->crop_scanline = reinterpret_cast<decltype(lj->crop_scanline)>(::dlsym(handle, "jpeg_crop_scanline"));
  if (!lj->skip_scanlines || !lj->crop_scanline) lj->skip_scanlines = nullptr, lj->crop_scanline = nullptr;
  {  // The library must accept our headers' version and struct size (it refuses through error_exit).
    Decoder probe;
    if (!create(probe, *lj)) {
      ::dlclose(handle);
      throw std::runtime_error(path + ": libjpeg does not match the 6.2 API wsitile was built with: " +
                               probe.err.message);
    }
    lj->destroy_decompress(&probe.cinfo);
    probe.created = false;
  }
  g_lib = lj.release();
}

bool libjpeg_loaded() {
  std::lock_guard<std::mutex> lock(g_load_mu);
  return g_lib != nullptr;
}

JpegTileReader::JpegTileReader(const std::string& path, std::shared_ptr<const JpegTileLayout> layout)
    : path_(path), layout_(std::move(layout)) {
  api_ = &lib();  // throws when libjpeg is not loaded; once loaded it stays for the process
  fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw FileNotFound(path_ + ": cannot open: " + std::strerror(errno));
  const std::optional<FileIdentity> now = file_identity(fd_);
  if (!now || *now != layout_->identity) {
    ::close(fd_);
    throw SlideChanged(path_ + ": the slide file changed since its JPEG tile layout was read; refusing to mix "
                               "pixels of two files");
  }
  size_t bits = 0;
  for (const JpegTileLevel& p : layout_->pages) {
    first_bit_.push_back(bits);
    bits += static_cast<size_t>(p.tiles_across() * p.tiles_down());
  }
  decoded_ = std::make_unique<std::atomic<uint64_t>[]>(bits / 64 + 1);  // value-initialised: all zero
}

JpegTileReader::~JpegTileReader() {
  if (fd_ >= 0) ::close(fd_);
}

const JpegTileLevel* JpegTileReader::page(int64_t width, int64_t height) const {
  const JpegTileLevel* found = nullptr;
  for (const JpegTileLevel& p : layout_->pages) {
    if (p.width != width || p.height != height) continue;
    if (found) return nullptr;  // two pages of one size: which one OpenSlide reads is not ours to guess
    found = &p;
  }
  return found;
}

void JpegTileReader::fail(const JpegTileLevel& page, int64_t col, int64_t row, const std::string& why) const {
  std::ostringstream msg;
  msg << path_ << ": JPEG tile (" << col << ", " << row << ") of the " << page.width << "x" << page.height
      << " page: " << why;
  throw SlideReadError(msg.str());
}

const std::vector<uint8_t>& JpegTileReader::read_bytes(const JpegTileLevel& page, int64_t col, int64_t row) const {
  if (col < 0 || row < 0 || col >= page.tiles_across() || row >= page.tiles_down()) fail(page, col, row, "no such tile");
  const size_t index = static_cast<size_t>(row * page.tiles_across() + col);
  if (index >= page.offsets.size() || index >= page.bytecounts.size()) fail(page, col, row, "missing from the tile table");
  const uint64_t offset = page.offsets[index], count = page.bytecounts[index];
  if (count == 0 || count > (uint64_t{1} << 31)) {
    fail(page, col, row, "byte count " + std::to_string(count) + " out of range");
  }
  thread_local std::vector<uint8_t> data;
  data.resize(static_cast<size_t>(count));
  size_t got = 0;
  while (got < count) {
    const ssize_t r = ::pread(fd_, data.data() + got, count - got, static_cast<off_t>(offset + got));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) fail(page, col, row, std::string("read failed: ") + std::strerror(errno));
    if (r == 0) fail(page, col, row, "truncated: the file ends inside the tile's " + std::to_string(count) + " bytes");
    got += static_cast<size_t>(r);
  }
  return data;
}

void JpegTileReader::decode_part(const JpegTileLevel& page, int64_t col, int64_t row, int64_t x, int64_t y, int64_t w,
                                 int64_t h, uint8_t* dst, int64_t stride, bool to_end) const {
  const std::vector<uint8_t>& data = read_bytes(page, col, row);
  // A fresh decompressor per tile, as OpenSlide does: tables left over from another page's tile can
  // never stand in for ones this tile lacks (creating one costs microseconds against the decode).
  Decoder dec;
  if (!create(dec, *api_)) fail(page, col, row, std::string("libjpeg: ") + dec.err.message);
  if (!decode(dec, *api_, page.tables.data(), page.tables.size(), data.data(), data.size(), page.ycbcr, page.tile, x, y,
              w, h, dst, stride, region_scratch(page.tile), to_end)) {
    fail(page, col, row, std::string("libjpeg: ") + dec.err.message);
  }
  // The tile's entropy-coded data decoded cleanly: to the end here (read_tile, a region's first read),
  // or a later region of a tile already marked so.
  mark_decoded(page, col, row);
}

namespace {
// The part of tile (col, row) inside the page: OpenSlide clips edge tiles (transparent beyond, white
// once composited).
std::pair<int64_t, int64_t> valid_extent(const JpegTileLevel& page, int64_t col, int64_t row) {
  const int64_t t = page.tile;
  return {std::min<int64_t>(t, page.width - col * t), std::min<int64_t>(t, page.height - row * t)};
}
}  // namespace

void JpegTileReader::read_tile(const JpegTileLevel& page, int64_t col, int64_t row, uint8_t* dst) const {
  const int64_t t = page.tile;
  decode_part(page, col, row, 0, 0, t, t, dst, t * 3, false);
  const auto [valid_w, valid_h] = valid_extent(page, col, row);
  if (valid_w < t) {
    for (int64_t y = 0; y < valid_h; ++y) std::memset(dst + (y * t + valid_w) * 3, 255, static_cast<size_t>((t - valid_w) * 3));
  }
  if (valid_h < t) std::memset(dst + valid_h * t * 3, 255, static_cast<size_t>((t - valid_h) * t * 3));
}

size_t JpegTileReader::tile_bit(const JpegTileLevel& page, int64_t col, int64_t row) const {
  const size_t p = static_cast<size_t>(&page - layout_->pages.data());
  return first_bit_.at(p) + static_cast<size_t>(row * page.tiles_across() + col);
}

bool JpegTileReader::decoded(const JpegTileLevel& page, int64_t col, int64_t row) const {
  const size_t bit = tile_bit(page, col, row);
  return (decoded_[bit / 64].load(std::memory_order_relaxed) >> (bit % 64)) & 1;
}

void JpegTileReader::mark_decoded(const JpegTileLevel& page, int64_t col, int64_t row) const {
  const size_t bit = tile_bit(page, col, row);
  decoded_[bit / 64].fetch_or(uint64_t{1} << (bit % 64), std::memory_order_relaxed);
}

bool JpegTileReader::can_read_regions() const { return api_->crop_scanline != nullptr; }

void JpegTileReader::read_tile_region(const JpegTileLevel& page, int64_t col, int64_t row, int64_t x, int64_t y,
                                      int64_t w, int64_t h, uint8_t* dst, int64_t stride) const {
  const int64_t t = page.tile;
  if (x < 0 || y < 0 || w < 1 || h < 1 || x + w > t || y + h > t) {
    fail(page, col, row, "region [" + std::to_string(x) + ", " + std::to_string(y) + ") + " + std::to_string(w) + "x" +
                             std::to_string(h) + " is not inside the tile");
  }
  if (!can_read_regions()) fail(page, col, row, "libjpeg " + api_->path + " has no jpeg_crop_scanline");
  // What lies beyond the page's edge is white (as read_tile); only the rest is decoded.
  const auto [valid_w, valid_h] = valid_extent(page, col, row);
  const int64_t dw = std::min(x + w, valid_w) - x, dh = std::min(y + h, valid_h) - y;
  if (dw > 0 && dh > 0) {
    // The first read of a tile entropy-decodes all of it, so corrupt data anywhere in the tile fails
    // every region of it, as it fails read_tile: which samples fail never depends on the decode path
    // (grid or shuffled order, cache size), and no region returns pixels of a stream that goes bad
    // further on. Later regions of a tile that decoded cleanly stop after their last row.
    decode_part(page, col, row, x, y, dw, dh, dst, stride, !decoded(page, col, row));
  }
  for (int64_t r = 0; r < h; ++r) {
    const int64_t from = r < dh && dw > 0 ? dw : 0;  // first white column of this row
    if (from < w) std::memset(dst + r * stride + from * 3, 255, static_cast<size_t>((w - from) * 3));
  }
}

}  // namespace wsitile
