#include "wsitile/block_cache.hpp"

#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <new>
#include <optional>

#include "wsitile/rng.hpp"

namespace wsitile {

namespace {

// Chunks of destroyed arenas, kept (up to kKeep bytes) for the arenas made after them: a loader per
// slide (predict), per validation pass or per benchmark round gets memory the kernel need not zero
// again. Kept chunks are MADV_FREE'd: under memory pressure the kernel takes their pages back (a later
// touch then gets a fresh zeroed page, as from mmap), otherwise reuse costs nothing. Blocks are always
// fully written before they are read, so whatever a reused page holds is never seen.
class ChunkPool {
 public:
  static ChunkPool& instance() {
    static ChunkPool* pool = [] {
      ChunkPool* made = new ChunkPool;  // never destroyed: arenas may die during exit
      // Held across fork(), as batch_buffers' pool: a child must not inherit mu_ locked by a worker.
      ::pthread_atfork([] { instance().mu_.lock(); }, [] { instance().mu_.unlock(); }, [] { instance().mu_.unlock(); });
      return made;
    }();
    return *pool;
  }

  // A kept chunk of at least `bytes` usable bytes (the smallest such), or nullopt.
  std::optional<BlockArena::Chunk> take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    auto best = chunks_.end();
    for (auto it = chunks_.begin(); it != chunks_.end(); ++it) {
      if (it->size >= bytes && (best == chunks_.end() || it->size < best->size)) best = it;
    }
    if (best == chunks_.end()) return std::nullopt;
    BlockArena::Chunk c = *best;
    chunks_.erase(best);
    kept_ -= c.total;
    return c;
  }

  void give(const BlockArena::Chunk& c) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (kept_ + c.total <= kKeep) {
#ifdef MADV_FREE
        const bool freed = ::madvise(c.base, c.size, MADV_FREE) == 0;
#else
        const bool freed = false;
#endif
        if (freed || ::madvise(c.base, c.size, MADV_DONTNEED) == 0) {
          chunks_.push_back(c);
          kept_ += c.total;
          return;
        }
      }
    }
    ::munmap(c.raw, c.total);
  }

 private:
  static constexpr size_t kKeep = size_t{1} << 30;  // a default loader's arena (512 MB cache) fits
  std::mutex mu_;
  std::vector<BlockArena::Chunk> chunks_;
  size_t kept_ = 0;
};

}  // namespace

BlockArena::~BlockArena() {
  for (const Chunk& c : chunks_) ChunkPool::instance().give(c);
}

uint8_t* BlockArena::take(size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(bytes);
    if (it != free_.end() && !it->second.empty()) {
      uint8_t* p = it->second.back();
      it->second.pop_back();
      return p;
    }
    if (left_ < bytes && mapped_ < limit_) {  // a new chunk; the old one's tail is left unused
      const size_t size = std::max(kChunk, (bytes + kHuge - 1) / kHuge * kHuge);
      std::optional<Chunk> chunk = ChunkPool::instance().take(size);
      if (!chunk) {
        void* raw = ::mmap(nullptr, size + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (raw != MAP_FAILED) {
          const uintptr_t aligned = (reinterpret_cast<uintptr_t>(raw) + kHuge - 1) / kHuge * kHuge;
          chunk = Chunk{raw, size + kHuge, reinterpret_cast<uint8_t*>(aligned), size};
#ifdef MADV_HUGEPAGE
          ::madvise(chunk->base, size, MADV_HUGEPAGE);  // advice only: without THP these are normal pages
#endif
        }
      }
      if (chunk) {
        chunks_.push_back(*chunk);
        next_ = chunk->base;
        left_ = chunk->size;
        mapped_ += chunk->size;
      }
    }
    if (left_ >= bytes) {
      uint8_t* p = next_;
      next_ += bytes;
      left_ -= bytes;
      return p;
    }
  }
  return new uint8_t[bytes];  // past the limit (or mmap failed): the heap, freed by give()
}

void BlockArena::give(uint8_t* p, size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const Chunk& c : chunks_) {
      if (p >= c.base && p < c.base + c.size) {
        free_[bytes].push_back(p);
        return;
      }
    }
  }
  delete[] p;
}

size_t BlockKeyHash::operator()(const BlockKey& k) const {
  return static_cast<size_t>(hash64(static_cast<uint64_t>(k.slide), static_cast<uint64_t>(k.level),
                                    static_cast<uint64_t>(k.bx), static_cast<uint64_t>(k.by)));
}

size_t BlockCache::bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return bytes_;
}

std::shared_ptr<const BlockCache::Block> BlockCache::get(const BlockKey& key, size_t bytes,
                                                         const std::function<void(uint8_t*)>& fill, bool wait) {
  std::promise<std::shared_ptr<const Block>> promise;
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (auto it = index_.find(key); it != index_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second);
      return it->second->second;
    }
    if (auto it = inflight_.find(key); it != inflight_.end()) {
      if (!wait) return nullptr;
      auto pending = it->second;
      lock.unlock();
      return pending.get();
    }
    inflight_.emplace(key, promise.get_future().share());
  }
  std::shared_ptr<Block> block;
  try {
    std::shared_ptr<BlockArena> arena = arena_;
    uint8_t* data = arena->take(bytes);
    try {
      block = std::shared_ptr<Block>(new Block(data, bytes), [arena](Block* b) {
        arena->give(b->data(), b->size());
        delete b;
      });
    } catch (...) {
      arena->give(data, bytes);
      throw;
    }
    fill(block->data());
  } catch (...) {
    std::lock_guard<std::mutex> lock(mu_);
    inflight_.erase(key);
    promise.set_exception(std::current_exception());
    throw;
  }
  std::lock_guard<std::mutex> lock(mu_);
  inflight_.erase(key);
  if (capacity_ >= bytes) {
    lru_.emplace_front(key, block);
    index_[key] = lru_.begin();
    bytes_ += bytes;
    while (bytes_ > capacity_) {  // evicted blocks live on while a worker still copies from them
      bytes_ -= lru_.back().second->size();
      index_.erase(lru_.back().first);
      lru_.pop_back();
    }
  }
  promise.set_value(block);
  return block;
}

}  // namespace wsitile
