#include "wsitile/openslide_api.hpp"

#include <dlfcn.h>

#include <mutex>
#include <stdexcept>

namespace wsitile {
namespace {

std::mutex g_mutex;
OpenSlideApi g_api;
std::string g_path;
bool g_loaded = false;

template <typename Fn>
void resolve(void* handle, const char* name, Fn& fn, bool required, const std::string& path) {
  fn = reinterpret_cast<Fn>(dlsym(handle, name));
  if (!fn && required) {
    throw std::runtime_error(path + ": libopenslide lacks symbol " + name);
  }
}

}  // namespace

void load_openslide(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_loaded) {
    if (path == g_path) return;
    throw std::runtime_error("libopenslide already loaded from " + g_path + ", not loading " + path);
  }
  // RTLD_LOCAL: the symbols stay private; if openslide-python opened the same file, dlopen returns
  // its handle and both share one library instance (one tile cache implementation, one glib).
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    const char* err = dlerror();
    throw std::runtime_error(path + ": cannot load libopenslide: " + (err ? err : "unknown error"));
  }
  OpenSlideApi api;
  resolve(handle, "openslide_open", api.open, true, path);
  resolve(handle, "openslide_close", api.close, true, path);
  resolve(handle, "openslide_get_error", api.get_error, true, path);
  resolve(handle, "openslide_get_level_count", api.get_level_count, true, path);
  resolve(handle, "openslide_get_level_dimensions", api.get_level_dimensions, true, path);
  resolve(handle, "openslide_get_level_downsample", api.get_level_downsample, true, path);
  resolve(handle, "openslide_read_region", api.read_region, true, path);
  resolve(handle, "openslide_get_property_value", api.get_property_value, true, path);
  resolve(handle, "openslide_detect_vendor", api.detect_vendor, true, path);
  resolve(handle, "openslide_get_version", api.get_version, true, path);
  resolve(handle, "openslide_cache_create", api.cache_create, false, path);
  resolve(handle, "openslide_set_cache", api.set_cache, false, path);
  resolve(handle, "openslide_cache_release", api.cache_release, false, path);
  g_api = api;
  g_path = path;
  g_loaded = true;  // the handle is never closed: slides may outlive any owner we could name
}

const OpenSlideApi& openslide_api() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_loaded) throw std::runtime_error("libopenslide is not loaded (call wsitile's load first)");
  return g_api;
}

bool openslide_loaded() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_loaded;
}

}  // namespace wsitile
