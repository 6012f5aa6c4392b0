// A byte-bounded LRU cache of RGB blocks of slide levels, shared by the loader's workers.
//
// Why: OpenSlide's read_region costs ~15 ns per pixel even when its tile cache hits (it blits tiles
// with cairo's SATURATE operator, which pixman runs on a float path), several times the JPEG decode.
// Overlapping windows (tower t > 0 overlaps its neighbours 2-4x) and later epochs would pay it again.
// Blocks are read once, at integral level coordinates (whole JPEG tiles decoded straight from the
// file where Slide::jpeg_tile_size allows, else kSize-pixel squares through OpenSlide), and windows
// are then assembled with memcpy; with an integral downsample this gives exactly the pixels a
// read_region of the window itself returns.
#pragma once

#include <cstdint>
#include <functional>
#include <future>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace wsitile {

struct BlockKey {
  int32_t slide, level;
  int64_t bx, by;  // block indices: level pixels [bx * size, (bx + 1) * size)
  bool operator==(const BlockKey& o) const {
    return slide == o.slide && level == o.level && bx == o.bx && by == o.by;
  }
};

struct BlockKeyHash {
  size_t operator()(const BlockKey& k) const;
};

class BlockCache {
 public:
  using Block = std::vector<uint8_t>;  // size x size x 3, RGB
  static constexpr int64_t kSize = 256;      // block edge read through OpenSlide
  static constexpr int64_t kMaxSize = 4096;  // largest block edge (a JPEG tile) the loader uses

  explicit BlockCache(size_t capacity_bytes) : capacity_(capacity_bytes) {}

  // The cached block, or fill(dst) into a new one of `bytes` bytes (the same for every request of one
  // key). Concurrent requests for a missing block wait for
  // the one read instead of repeating it; a fill that throws is rethrown to every waiter.
  std::shared_ptr<const Block> get(const BlockKey& key, size_t bytes, const std::function<void(uint8_t*)>& fill);

  size_t capacity() const { return capacity_; }
  size_t bytes() const;

  static constexpr size_t block_bytes(int64_t size = kSize) { return static_cast<size_t>(size * size * 3); }

 private:
  using Lru = std::list<std::pair<BlockKey, std::shared_ptr<const Block>>>;
  size_t capacity_;
  mutable std::mutex mu_;
  Lru lru_;  // most recent first
  std::unordered_map<BlockKey, Lru::iterator, BlockKeyHash> index_;
  std::unordered_map<BlockKey, std::shared_future<std::shared_ptr<const Block>>, BlockKeyHash> inflight_;
  size_t bytes_ = 0;
};

}  // namespace wsitile
