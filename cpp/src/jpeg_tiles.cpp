#include "wsitile/jpeg_tiles.hpp"

#include <dlfcn.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <sstream>
#include <memory>
#include <stdexcept>
#include <type_traits>

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

// Decodes one tile into dst (tile x tile RGB). Returns false with err.message set on failure. No
// object with a destructor lives in this frame: longjmp may leave it.
bool decode(Decoder& d, const LibJpeg& api, const uint8_t* tables, size_t tables_len, const uint8_t* data,
            size_t len, bool ycbcr, int32_t tile, uint8_t* dst) {
  jpeg_decompress_struct* cinfo = &d.cinfo;
  if (setjmp(d.err.env)) {
    api.abort_decompress(cinfo);
    return false;
  }
  if (tables_len > 0) {
    api.mem_src(cinfo, tables, static_cast<unsigned long>(tables_len));
    if (api.read_header(cinfo, FALSE) != JPEG_HEADER_TABLES_ONLY) {
      std::snprintf(d.err.message, sizeof d.err.message, "cannot load the JPEGTables");
      api.abort_decompress(cinfo);
      return false;
    }
  }
  api.mem_src(cinfo, data, static_cast<unsigned long>(len));
  if (api.read_header(cinfo, TRUE) != JPEG_HEADER_OK) {
    std::snprintf(d.err.message, sizeof d.err.message, "cannot read the JPEG header");
    api.abort_decompress(cinfo);
    return false;
  }
  // OpenSlide's settings: the colour space the TIFF photometric tag names, libjpeg's defaults
  // otherwise (islow IDCT, fancy upsampling).
  cinfo->jpeg_color_space = ycbcr ? JCS_YCbCr : JCS_RGB;
  cinfo->out_color_space = JCS_RGB;
  api.start_decompress(cinfo);
  if (cinfo->output_width != static_cast<JDIMENSION>(tile) || cinfo->output_height != static_cast<JDIMENSION>(tile) ||
      cinfo->output_components != 3) {
    std::snprintf(d.err.message, sizeof d.err.message, "JPEG is %ux%u with %d components, expected %dx%d RGB",
                  cinfo->output_width, cinfo->output_height, cinfo->output_components, tile, tile);
    api.abort_decompress(cinfo);
    return false;
  }
  JSAMPROW rows[8];
  while (cinfo->output_scanline < cinfo->output_height) {
    const JDIMENSION first = cinfo->output_scanline;
    const JDIMENSION n = std::min<JDIMENSION>(8, cinfo->output_height - first);
    for (JDIMENSION i = 0; i < n; ++i) rows[i] = dst + static_cast<size_t>(first + i) * tile * 3;
    api.read_scanlines(cinfo, rows, n);
  }
  api.abort_decompress(cinfo);  // resets for the next tile; the trailing EOI is not needed
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

void JpegTileReader::read_tile(const JpegTileLevel& page, int64_t col, int64_t row, uint8_t* dst) const {
  const LibJpeg& api = *api_;
  auto fail = [&](const std::string& why) {
    std::ostringstream msg;
    msg << path_ << ": JPEG tile (" << col << ", " << row << ") of the " << page.width << "x" << page.height
        << " page: " << why;
    throw SlideReadError(msg.str());
  };
  if (col < 0 || row < 0 || col >= page.tiles_across() || row >= page.tiles_down()) fail("no such tile");
  const size_t index = static_cast<size_t>(row * page.tiles_across() + col);
  if (index >= page.offsets.size() || index >= page.bytecounts.size()) fail("missing from the tile table");
  const uint64_t offset = page.offsets[index], count = page.bytecounts[index];
  if (count == 0 || count > (uint64_t{1} << 31)) fail("byte count " + std::to_string(count) + " out of range");

  thread_local std::vector<uint8_t> data;
  data.resize(static_cast<size_t>(count));
  size_t got = 0;
  while (got < count) {
    const ssize_t r = ::pread(fd_, data.data() + got, count - got, static_cast<off_t>(offset + got));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) fail(std::string("read failed: ") + std::strerror(errno));
    if (r == 0) fail("truncated: the file ends inside the tile's " + std::to_string(count) + " bytes");
    got += static_cast<size_t>(r);
  }

  // A fresh decompressor per tile, as OpenSlide does: tables left over from another page's tile can
  // never stand in for ones this tile lacks (creating one costs microseconds against the decode).
  Decoder dec;
  if (!create(dec, api)) fail(std::string("libjpeg: ") + dec.err.message);
  if (!decode(dec, api, page.tables.data(), page.tables.size(), data.data(), data.size(), page.ycbcr, page.tile, dst)) {
    fail(std::string("libjpeg: ") + dec.err.message);
  }
  // OpenSlide clips edge tiles to the page (transparent beyond, white once composited).
  const int64_t t = page.tile;
  const int64_t valid_w = std::min<int64_t>(t, page.width - col * t), valid_h = std::min<int64_t>(t, page.height - row * t);
  if (valid_w < t) {
    for (int64_t y = 0; y < valid_h; ++y) std::memset(dst + (y * t + valid_w) * 3, 255, static_cast<size_t>((t - valid_w) * 3));
  }
  if (valid_h < t) std::memset(dst + valid_h * t * 3, 255, static_cast<size_t>((t - valid_h) * t * 3));
}

}  // namespace wsitile
