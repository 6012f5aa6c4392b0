// The batch loader: a thread pool that cuts multi-scale window pairs out of slides into batches the
// consumer takes in a fixed order.
//
// Order and content depend only on (seed, epoch, position in the epoch), never on the thread count:
// the epoch's sample order is computed up front from a counter-based RNG, each batch is split into
// chunks that workers fill independently, and batches are handed out in order.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "wsitile/augment.hpp"
#include "wsitile/batch_buffers.hpp"
#include "wsitile/block_cache.hpp"
#include "wsitile/slide.hpp"

namespace wsitile {

struct LoaderConfig {
  std::vector<int32_t> levels{2, 3};  // one tower per level; tower 0 is the base level Lb
  int64_t window = 80;
  int64_t batch_size = 64;
  int threads = 1;
  bool shuffle = true;
  bool balanced = false;  // tumour:normal drawn 1:1 (Liu et al.)
  bool drop_last = false;
  uint64_t seed = 0;
  size_t cache_bytes = size_t{512} << 20;       // RGB block cache shared by all slides (0: off)
  size_t tile_cache_bytes = size_t{32} << 20;   // OpenSlide's decoded-tile cache, shared by all slides
  // A sample OpenSlide cannot read (corrupt tile): false -> the batch throws SlideReadError naming the
  // slide and coordinates; true -> the sample is left out of its batch (which comes out shorter) and
  // reported in Batch::skipped. A deleted or replaced file (SlideChanged) always throws.
  bool skip_errors = false;
  // Fused augmentation, applied by the worker right after it cuts a window (no extra batch pass).
  std::optional<AugmentConfig> augment;
  OutDtype out_dtype = OutDtype::kUint8;
  // Shuffled epochs whose JPEG tiles would mostly miss the block cache cut windows from just their
  // part of each tile (choose_block_policy); false keeps whole tiles in the cache regardless.
  bool tile_regions = true;
};

// The grid over all slides, one row per window.
struct SampleTable {
  std::vector<int32_t> slide;  // index into the loader's slide list
  std::vector<int64_t> x, y;   // tower 0's top-left in level-Lb pixels
  std::vector<uint8_t> label;
  int64_t size() const { return static_cast<int64_t>(slide.size()); }
};

// A sample left out of its batch (LoaderConfig::skip_errors).
struct SkipRecord {
  int64_t sample_index = 0;  // row of the sample table
  int32_t slide = 0;
  int64_t x0 = 0, y0 = 0;    // level-0 (x, y) of tower 0's top-left, as Batch::coords
  std::string message;       // why (names the slide path, level and region)
};

struct Batch {
  int64_t size = 0, towers = 0, window = 0;
  OutDtype dtype = OutDtype::kUint8;
  ImageBytes images;  // (size, towers, window, window, 3) RGB of `dtype` (raw bytes), all written by workers
  std::vector<uint8_t> labels;  // (size,)
  std::vector<int64_t> coords;  // (size, 2) level-0 (x, y) of tower 0's top-left
  std::vector<int32_t> slide_index;
  std::vector<int64_t> sample_index;  // row of the sample table
  std::vector<SkipRecord> skipped;    // samples left out (skip_errors); size + skipped = samples taken
};

struct LoaderState {
  uint64_t seed = 0;
  int64_t epoch = 0;
  int64_t index = 0;  // position (in samples) of the next batch within the epoch
};

// Where tower t of a sample lies: its top-left in level-t pixels and the level-0 point to read at.
struct TowerPlacement {
  int64_t lx, ly;  // level-t pixels
  int64_t x0, y0;  // level-0 pixels passed to read_region: round(l * d_t)
};
TowerPlacement place_tower(int64_t x, int64_t y, int64_t window, double d0, double dt, bool base);

class Loader {
 public:
  // `jpeg_tiles`: empty, or one tile layout (or null) per slide, enabling the direct JPEG decode of
  // blocks (Slide::jpeg_tile_size).
  Loader(const std::vector<std::string>& slide_paths, SampleTable samples, LoaderConfig cfg,
         std::vector<std::shared_ptr<const JpegTileLayout>> jpeg_tiles = {});
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  int64_t num_samples() const { return samples_.size(); }
  size_t cache_bytes_used() const { return blocks_ && !forked() ? blocks_->bytes() : 0; }
  bool uses_block_cache(int32_t slide) const { return geometry_.at(slide).blocks; }
  // True when tower `tower` of `slide` decodes its blocks straight from JPEG tiles (not OpenSlide).
  bool decodes_jpeg_tiles(int32_t slide, size_t tower) const {
    const SlideGeometry& g = geometry_.at(slide);
    return (g.blocks || g.region.at(tower)) && g.jpeg.at(tower);
  }
  // True when tower `tower` of `slide` cuts each window straight from the JPEG tiles it overlaps,
  // decoding only the window's part of each and caching nothing (shuffled epochs whose blocks would
  // mostly miss the block cache, or no block cache at all; see choose_block_policy).
  bool decodes_tile_regions(int32_t slide, size_t tower) const { return geometry_.at(slide).region.at(tower); }
  int64_t batches_per_epoch() const;
  const LoaderConfig& config() const { return cfg_; }
  LoaderState state() const;
  void set_state(const LoaderState& s);  // drops the work in flight

  // The next batch, or std::nullopt at the end of an epoch (the state then moves to the next epoch).
  // Rethrows a worker's exception; the position stays at the failed batch. With skip_errors a batch
  // may come out shorter than batch_size, or empty when every sample of it failed.
  // The first take of an epoch checks that no slide file changed since it was opened (throws
  // SlideChanged); each chunk of work checks its slides again after reading them.
  // Several threads may call take() at once: each batch goes to exactly one of them, in order.
  std::optional<Batch> take();
  // take(), waiting at most `timeout`: true with `out` set as take() returns it, or false with
  // nothing taken when no batch was ready in time. Lets a consumer wait in slices and stay responsive
  // to signals, also while other threads take the batches it was waiting for.
  bool take_for(std::chrono::milliseconds timeout, std::optional<Batch>& out);
  void close();  // stops the workers; further use throws

 private:
  struct Pending;
  // The OpenSlide handle of one slide. A handle on which a read failed is dead (OpenSlide latches
  // its first error) and is swapped for a fresh one; readers hold a shared_ptr, so a swapped-out
  // handle is closed when its last read ends.
  struct SlideSlot {
    mutable std::mutex mu;
    std::shared_ptr<Slide> slide;
    std::shared_ptr<const JpegTileLayout> jpeg_tiles;  // for fresh handles of the same file
  };
  struct SlideGeometry {
    std::vector<double> downsample;  // per tower
    bool exact = true;    // integral downsamples: windows can be assembled from blocks exactly
    bool blocks = false;  // windows come from the block cache (else: one read_region per window)
    std::vector<int64_t> block;  // per tower: block edge (the JPEG tile edge where jpeg, else kSize)
    std::vector<bool> jpeg;      // per tower: blocks are JPEG tiles decoded straight from the file
    std::vector<bool> region;    // per tower: windows decoded from their part of each tile, uncached
  };

  void start_epoch_locked();
  void fill_pipeline_locked();
  void drop_pipeline_locked();
  void run_chunk(const std::shared_ptr<Pending>& p, int64_t begin, int64_t end);
  // The blocks a chunk used last. Why: a chunk's windows are mostly neighbours that share blocks, and
  // asking the shared cache for each (its lock, its LRU list, the block's reference count: cache
  // lines every worker writes) cost more per window the more threads ran.
  struct BlockMemo {
    static constexpr size_t kSlots = 16;  // >= the blocks of one sample (up to 4 per tower)
    std::array<BlockKey, kSlots> key{};
    std::array<std::shared_ptr<const BlockCache::Block>, kSlots> block;
    size_t next = 0;
  };
  // `may_defer`: give up (return false) rather than wait for a block another worker is decoding.
  bool cut_window(int32_t s, size_t t, int64_t x, int64_t y, uint8_t* dst, bool may_defer, BlockMemo& memo) const;
  void cut_window_fresh(int32_t s, size_t t, int64_t x, int64_t y, uint8_t* dst, int64_t sample) const;
  bool extract_sample(Pending& p, int64_t k, bool may_defer, BlockMemo& memo);
  bool assemble(int32_t s, size_t t, int64_t lx, int64_t ly, uint8_t* dst, bool may_defer, BlockMemo& memo) const;
  std::shared_ptr<Slide> slide(int32_t s) const;
  void replace_dead(int32_t s, const std::shared_ptr<Slide>& dead, std::shared_ptr<Slide> fresh) const;
  void check_slides_unchanged_locked();
  void choose_block_policy();
  // Tower t of slide s may cut windows from JPEG tile parts: tile_regions on, integral downsamples,
  // JPEG tiles, and partial decodes checked on that level.
  bool can_cut_tile_parts(size_t s, size_t t) const;
  void worker_loop();
  int64_t epoch_end() const;
  // Throws in a process forked from the one that made this loader: its worker threads do not exist
  // there and mu_ may have been held by one of them at the fork, so waiting would hang for ever.
  void check_process() const;
  bool forked() const;
  bool take_until(std::optional<std::chrono::steady_clock::time_point> deadline, std::optional<Batch>& out);
  // In a forked child: hands everything whose destructor could wait for the parent's threads (the
  // workers, the synchronisation, the work in flight and its batch buffers, the slides and caches)
  // to a heap object that is never freed, so that destroying this copy cannot hang.
  void leak_after_fork();

  LoaderConfig cfg_;
  SampleTable samples_;
  std::vector<std::unique_ptr<SlideSlot>> slides_;
  std::vector<SlideGeometry> geometry_;
  std::shared_ptr<TileCache> cache_;
  std::unique_ptr<BlockCache> blocks_;
  std::vector<int64_t> class_members_[2];
  int64_t chunk_ = 1;
  size_t prefetch_ = 2;

  // On the heap so that a forked child's copy can leak it (see leak_after_fork): in the child,
  // destroying a condition variable the parent's workers were waiting on blocks for ever (glibc waits
  // for its waiters), as would locking a mutex one of them held.
  struct Sync {
    std::mutex mu;
    std::condition_variable work, done;
  };
  std::unique_ptr<Sync> sync_ = std::make_unique<Sync>();
  std::mutex& mu_ = sync_->mu;
  std::condition_variable& work_cv_ = sync_->work;
  std::condition_variable& done_cv_ = sync_->done;
  std::deque<std::function<void()>> tasks_;
  std::deque<std::shared_ptr<Pending>> pending_;
  std::shared_ptr<const std::vector<int64_t>> order_;  // this epoch's sample order
  LoaderState state_;
  int64_t scheduled_ = 0;  // position of the next batch to schedule
  bool check_identity_ = true;  // the epoch's first wait/take stats every slide
  std::atomic<bool> stopping_{false};
  std::vector<std::thread> workers_;
  std::mutex close_mu_;  // one close() joins the workers; a concurrent one waits for it
  const int64_t pid_;    // the process that started workers_
};

}  // namespace wsitile
