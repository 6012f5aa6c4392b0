#include "wsitile/block_cache.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <new>

#include "wsitile/rng.hpp"

namespace wsitile {

BlockArena::~BlockArena() {
  for (auto& [p, n] : chunks_) ::munmap(p, n);
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
      void* raw = ::mmap(nullptr, size + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (raw != MAP_FAILED) {
        chunks_.emplace_back(raw, size + kHuge);
        const uintptr_t aligned = (reinterpret_cast<uintptr_t>(raw) + kHuge - 1) / kHuge * kHuge;
        next_ = reinterpret_cast<uint8_t*>(aligned);
        left_ = size;
        mapped_ += size;
#ifdef MADV_HUGEPAGE
        ::madvise(next_, size, MADV_HUGEPAGE);  // advice only: without THP these are normal pages
#endif
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
    for (const auto& [base, n] : chunks_) {
      const uint8_t* b = static_cast<const uint8_t*>(base);
      if (p >= b && p < b + n) {
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
                                                         const std::function<void(uint8_t*)>& fill) {
  std::promise<std::shared_ptr<const Block>> promise;
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (auto it = index_.find(key); it != index_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second);
      return it->second->second;
    }
    if (auto it = inflight_.find(key); it != inflight_.end()) {
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
