#include "wsitile/block_cache.hpp"

#include "wsitile/rng.hpp"

namespace wsitile {

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
    block = std::make_shared<Block>(bytes);
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
