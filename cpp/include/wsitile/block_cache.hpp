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

// Memory for blocks: 2 MiB-aligned chunks advised as transparent huge pages, carved into blocks and
// recycled through per-size free lists; past `limit` bytes of chunks, plain new[]/delete[]. A
// destroyed arena's chunks go to a process-wide pool (block_cache.cpp) that the next arena takes
// its chunks from.
//
// Why: a cold epoch fills hundreds of fresh ~192 KiB blocks. From malloc each one was an mmap of its
// own plus 48 page faults, and the kernel's share was ~45% of a cold epoch's wall time on one thread
// (more with two, whose faults and mmaps contend for the process's memory map). A huge page faults
// once per 2 MiB. The kernel still zeroes every fresh page it hands out, ~15% of a cold epoch (more
// with two threads faulting at once); pooled chunks are not zeroed again.
class BlockArena {
 public:
  explicit BlockArena(size_t limit) : limit_(limit) {}
  ~BlockArena();
  BlockArena(const BlockArena&) = delete;
  BlockArena& operator=(const BlockArena&) = delete;
  uint8_t* take(size_t bytes);
  void give(uint8_t* p, size_t bytes);

  struct Chunk {
    void* raw;      // the mmap'd region
    size_t total;   // its length
    uint8_t* base;  // 2 MiB-aligned start of the usable part
    size_t size;    // usable bytes, a multiple of 2 MiB
  };

 private:
  static constexpr size_t kHuge = size_t{2} << 20, kChunk = size_t{32} << 20;
  size_t limit_;
  std::mutex mu_;
  std::vector<Chunk> chunks_;
  uint8_t* next_ = nullptr;                       // bump pointer into the newest chunk
  size_t left_ = 0, mapped_ = 0;
  std::unordered_map<size_t, std::vector<uint8_t*>> free_;  // by block size
};

class BlockCache {
 public:
  // size x size x 3 RGB bytes, owned by the cache's arena.
  class Block {
   public:
    Block(uint8_t* data, size_t size) : data_(data), size_(size) {}
    uint8_t* data() { return data_; }
    const uint8_t* data() const { return data_; }
    size_t size() const { return size_; }

   private:
    uint8_t* data_;
    size_t size_;
  };
  static constexpr int64_t kSize = 256;      // block edge read through OpenSlide
  static constexpr int64_t kMaxSize = 4096;  // largest block edge (a JPEG tile) the loader uses

  // The arena maps at most the capacity + 64 MiB (and the chunk that crosses that line): slack for
  // blocks being filled, blocks evicted while a worker still copies from them, and free slots of
  // another block size.
  explicit BlockCache(size_t capacity_bytes)
      : capacity_(capacity_bytes), arena_(std::make_shared<BlockArena>(capacity_bytes + (size_t{64} << 20))) {}

  // The cached block, or fill(dst) into a new one of `bytes` bytes (the same for every request of one
  // key). Concurrent requests for a missing block wait for the one read instead of repeating it (or,
  // with wait = false, return null at once); a fill that throws is rethrown to every waiter.
  std::shared_ptr<const Block> get(const BlockKey& key, size_t bytes, const std::function<void(uint8_t*)>& fill,
                                   bool wait = true);

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
  std::shared_ptr<BlockArena> arena_;  // blocks hold it too: they may outlive the cache
};

}  // namespace wsitile
