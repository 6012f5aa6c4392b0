#include "wsitile/batch_buffers.hpp"

#include <pthread.h>

#include <mutex>
#include <unordered_map>

namespace wsitile::batch_buffers {

namespace {
// Enough for a 16-thread loader's batches in flight plus a few the consumer still holds, at 299 px.
// Under AddressSanitizer nothing is kept, so a use after free of a batch stays detectable.
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kMaxKept = 0;
#else
constexpr size_t kMaxKept = 16;
#endif
constexpr size_t kMaxBytes = size_t{256} << 20;

struct Pool {
  std::mutex mu;
  std::unordered_map<size_t, std::vector<void*>> free;  // by size
  size_t count = 0, bytes = 0;
};

Pool& pool() {
  static Pool* p = [] {
    Pool* made = new Pool;  // never destroyed: NumPy arrays may free batches during exit
    // Held across fork(): a child forked while a loader's worker held mu would otherwise inherit it
    // locked for ever, and hang freeing its first batch (or making a loader of its own).
    ::pthread_atfork([] { pool().mu.lock(); }, [] { pool().mu.unlock(); }, [] { pool().mu.unlock(); });
    return made;
  }();
  return *p;
}
}  // namespace

void* take(size_t bytes) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    auto it = p.free.find(bytes);
    if (it != p.free.end() && !it->second.empty()) {
      void* b = it->second.back();
      it->second.pop_back();
      p.count -= 1;
      p.bytes -= bytes;
      return b;
    }
  }
  return ::operator new(bytes);
}

void give(void* b, size_t bytes) noexcept {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    if (p.count < kMaxKept && p.bytes + bytes <= kMaxBytes) {
      try {
        p.free[bytes].push_back(b);
        p.count += 1;
        p.bytes += bytes;
        return;
      } catch (...) {  // no memory for the list entry: free the buffer instead
      }
    }
  }
  ::operator delete(b);
}

}  // namespace wsitile::batch_buffers
