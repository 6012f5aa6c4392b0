// Run-time binding to libopenslide's C API.
//
// wsitile never links OpenSlide at build time: the Python layer passes the path of the library that
// openslide-python already loaded (the openslide-bin wheel's copy), and this file resolves the few
// functions the engine needs with dlopen/dlsym. One process therefore uses one libopenslide.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace wsitile {

struct openslide_t;        // opaque, as in openslide.h
struct openslide_cache_t;  // opaque

struct OpenSlideApi {
  openslide_t* (*open)(const char*) = nullptr;
  void (*close)(openslide_t*) = nullptr;
  const char* (*get_error)(openslide_t*) = nullptr;
  int32_t (*get_level_count)(openslide_t*) = nullptr;
  void (*get_level_dimensions)(openslide_t*, int32_t, int64_t*, int64_t*) = nullptr;
  double (*get_level_downsample)(openslide_t*, int32_t) = nullptr;
  void (*read_region)(openslide_t*, uint32_t*, int64_t, int64_t, int32_t, int64_t, int64_t) = nullptr;
  const char* (*get_property_value)(openslide_t*, const char*) = nullptr;
  const char* (*detect_vendor)(const char*) = nullptr;
  const char* (*get_version)() = nullptr;
  // OpenSlide >= 4.0: shared, size-bounded tile caches. Null on older libraries.
  openslide_cache_t* (*cache_create)(size_t) = nullptr;
  void (*set_cache)(openslide_t*, openslide_cache_t*) = nullptr;
  void (*cache_release)(openslide_cache_t*) = nullptr;
};

// Loads libopenslide from `path` (idempotent for the same path). Throws std::runtime_error naming the
// path or the missing symbol.
void load_openslide(const std::string& path);

// The loaded API. Throws std::runtime_error when load_openslide has not succeeded yet.
const OpenSlideApi& openslide_api();

bool openslide_loaded();

}  // namespace wsitile
