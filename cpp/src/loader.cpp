#include "wsitile/loader.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <system_error>
#include <utility>

#include <unistd.h>

#include "wsitile/parallel.hpp"
#include "wsitile/rng.hpp"

namespace wsitile {

namespace {
constexpr int kMaxThreads = 1024;
constexpr int64_t kMaxWindow = int64_t{1} << 16;
constexpr int64_t kMaxCoordinate = int64_t{1} << 40;
constexpr int64_t kMaxBatchBytes = int64_t{1} << 40;

// A handle opened again on `opened`'s path found another file there.
[[noreturn]] void throw_changed(const Slide& opened) {
  opened.check_unchanged();  // throws SlideChanged with the details
  throw SlideChanged(opened.path() + ": the slide file changed since it was opened");
}
}  // namespace

struct Loader::Pending {
  uint64_t seed = 0;
  int64_t epoch = 0, start = 0;
  std::shared_ptr<const std::vector<int64_t>> order;
  Batch batch;
  int64_t count = 0;              // samples taken from the epoch (batch.size before skips)
  std::vector<std::string> skip;  // per sample: why it was skipped, empty if it was not
  int remaining = 0;  // chunks not finished; guarded by Loader::mu_
  std::exception_ptr error;
  bool done() const { return remaining == 0; }
};

TowerPlacement place_tower(int64_t x, int64_t y, int64_t window, double d0, double dt, bool base) {
  TowerPlacement p{};
  if (base) {
    p.lx = x;
    p.ly = y;
  } else {
    // Concentric on tower 0's centre c (level-0 units): top-left = floor(c / d_t - window / 2).
    const double half = static_cast<double>(window) / 2.0;
    const double cx = (static_cast<double>(x) + half) * d0, cy = (static_cast<double>(y) + half) * d0;
    p.lx = static_cast<int64_t>(std::floor(cx / dt - half));
    p.ly = static_cast<int64_t>(std::floor(cy / dt - half));
  }
  p.x0 = std::llround(static_cast<double>(p.lx) * dt);
  p.y0 = std::llround(static_cast<double>(p.ly) * dt);
  return p;
}

Loader::Loader(const std::vector<std::string>& slide_paths, SampleTable samples, LoaderConfig cfg,
               std::vector<std::shared_ptr<const JpegTileLayout>> jpeg_tiles)
    : cfg_(std::move(cfg)), samples_(std::move(samples)), pid_(::getpid()) {
  if (!jpeg_tiles.empty() && jpeg_tiles.size() != slide_paths.size()) {
    throw std::invalid_argument("jpeg_tiles: one layout (or none) per slide is needed");
  }
  if (cfg_.levels.empty()) throw std::invalid_argument("levels: at least one tower level is needed");
  if (cfg_.window < 1) throw std::invalid_argument("window must be >= 1");
  if (cfg_.batch_size < 1) throw std::invalid_argument("batch_size must be >= 1");
  if (cfg_.threads < 1 || cfg_.threads > kMaxThreads) {
    throw std::invalid_argument("threads must be in [1, " + std::to_string(kMaxThreads) + "]");
  }
  if (cfg_.window > kMaxWindow) throw std::invalid_argument("window must be <= " + std::to_string(kMaxWindow));
  if (cfg_.levels.size() > 64) throw std::invalid_argument("levels: at most 64 towers");
  const int64_t n = samples_.size();
  if (static_cast<int64_t>(samples_.x.size()) != n || static_cast<int64_t>(samples_.y.size()) != n ||
      static_cast<int64_t>(samples_.label.size()) != n) {
    throw std::invalid_argument("sample table columns differ in length");
  }
  {  // one batch buffer must be allocatable: at most kMaxBatchBytes (no size_t overflow on the way)
    const double bytes = static_cast<double>(std::min(cfg_.batch_size, std::max<int64_t>(n, 1))) *
                         static_cast<double>(cfg_.levels.size()) * static_cast<double>(cfg_.window) *
                         static_cast<double>(cfg_.window) * 3.0 * out_itemsize(cfg_.out_dtype);
    if (bytes > static_cast<double>(kMaxBatchBytes)) {
      std::ostringstream msg;
      msg << "a batch of " << cfg_.batch_size << " samples x " << cfg_.levels.size() << " towers of " << cfg_.window
          << "x" << cfg_.window << " px would take " << bytes << " bytes (limit " << kMaxBatchBytes << ")";
      throw std::invalid_argument(msg.str());
    }
  }
  if (openslide_api().cache_create) cache_ = std::make_shared<TileCache>(cfg_.tile_cache_bytes);
  if (cfg_.cache_bytes >= BlockCache::block_bytes()) blocks_ = std::make_unique<BlockCache>(cfg_.cache_bytes);
  for (size_t i = 0; i < slide_paths.size(); ++i) {
    slides_.push_back(std::make_unique<SlideSlot>());
    SlideSlot& slot = *slides_.back();
    if (!jpeg_tiles.empty()) slot.jpeg_tiles = jpeg_tiles[i];
    slot.slide = std::make_shared<Slide>(slide_paths[i], cache_, slot.jpeg_tiles);
    const Slide& s = *slot.slide;
    SlideGeometry g;
    for (int32_t lvl : cfg_.levels) {
      const double d = s.level(lvl).downsample;  // throws naming the levels that exist
      g.downsample.push_back(d);
      g.exact = g.exact && d == std::floor(d);
    }
    for (int32_t lvl : cfg_.levels) {
      // JPEG tiles serve the block cache and, without one (cache_mb=0), windows cut from tile parts.
      const int32_t tile = g.exact && (blocks_ || cfg_.tile_regions) ? s.jpeg_tile_size(lvl) : 0;
      g.jpeg.push_back(tile > 0);
      g.block.push_back(tile > 0 ? tile : BlockCache::kSize);
    }
    geometry_.push_back(std::move(g));
  }
  for (int64_t i = 0; i < n; ++i) {
    const int32_t s = samples_.slide[i];
    if (s < 0 || s >= static_cast<int32_t>(slides_.size())) {
      std::ostringstream msg;
      msg << "sample " << i << " names slide " << s << " but " << slides_.size() << " slides were given";
      throw std::invalid_argument(msg.str());
    }
    // Every level-0 point a tower or its blocks can touch stays within +-2^40 (Slide::check_region),
    // far from int64 overflow: (|x| + 2 window + one block) * the largest downsample.
    double max_d = 1.0;
    for (double d : geometry_[s].downsample) max_d = std::max(max_d, d);
    const double reach = static_cast<double>(2 * cfg_.window + BlockCache::kMaxSize) * max_d;
    const double ax = std::fabs(static_cast<double>(samples_.x[i])), ay = std::fabs(static_cast<double>(samples_.y[i]));
    if (std::max(ax, ay) * max_d + reach > static_cast<double>(kMaxCoordinate)) {
      std::ostringstream msg;
      msg << "sample " << i << ": level-" << cfg_.levels[0] << " coordinates (" << samples_.x[i] << ", " << samples_.y[i]
          << ") put the windows beyond level-0 +-2^40";
      throw std::invalid_argument(msg.str());
    }
    class_members_[samples_.label[i] ? 1 : 0].push_back(i);
  }
  if (cfg_.balanced && n > 0 && (class_members_[0].empty() || class_members_[1].empty())) {
    throw std::invalid_argument(std::string("balanced sampling needs tumour and normal windows, but there are no ") +
                                (class_members_[1].empty() ? "tumour" : "normal") + " windows");
  }
  choose_block_policy();
  // Chunks of a batch are the unit of work: about two per thread, so a batch spreads over the pool.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(cfg_.batch_size, 2 * cfg_.threads));
  chunk_ = (cfg_.batch_size + chunks - 1) / chunks;
  const int64_t per_batch = (cfg_.batch_size + chunk_ - 1) / chunk_;
  prefetch_ = static_cast<size_t>(std::max<int64_t>(2, (2 * cfg_.threads + per_batch - 1) / per_batch));

  state_.seed = cfg_.seed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    start_epoch_locked();
  }
  const AsyncSignalsBlocked workers_leave_signals;  // the workers keep the mask; this thread's is restored
  for (int t = 0; t < cfg_.threads; ++t) {
    try {
      workers_.emplace_back([this] { worker_loop(); });
    } catch (const std::system_error& e) {  // a process or cgroup thread limit (ulimit -u, pids.max)
      close();  // the constructor throws, so no destructor will: stop and join the ones started
      throw std::runtime_error("cannot start loader worker thread " + std::to_string(t + 1) + " of " +
                               std::to_string(cfg_.threads) + " (" + e.what() + "): use fewer threads");
    }
  }
}

Loader::~Loader() {
  if (forked()) {
    leak_after_fork();
    return;
  }
  close();
}

void Loader::leak_after_fork() {
  struct Leaked {
    std::unique_ptr<Sync> sync;
    std::vector<std::thread> workers;
    std::deque<std::function<void()>> tasks;
    std::deque<std::shared_ptr<Pending>> pending;
    std::vector<std::unique_ptr<SlideSlot>> slides;
    std::shared_ptr<TileCache> cache;
    std::unique_ptr<BlockCache> blocks;
  };
  stopping_ = true;
  if (!sync_) return;  // already left behind (close(), then the destructor)
  new Leaked{std::move(sync_), std::move(workers_), std::move(tasks_), std::move(pending_),
             std::move(slides_), std::move(cache_), std::move(blocks_)};
}

void Loader::close() {
  if (forked()) {  // a forked child's copy: no worker to stop or join, mu_ perhaps held for ever
    leak_after_fork();
    return;
  }
  std::lock_guard<std::mutex> closing(close_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && workers_.empty()) return;
    stopping_ = true;
    tasks_.clear();
  }
  work_cv_.notify_all();
  done_cv_.notify_all();
  for (auto& w : workers_) w.join();
  workers_.clear();
}

int64_t Loader::batches_per_epoch() const {
  const int64_t n = samples_.size(), b = cfg_.batch_size;
  return cfg_.drop_last ? n / b : (n + b - 1) / b;
}

// Samples handed out per epoch: all of them, or only whole batches with drop_last.
int64_t Loader::epoch_end() const {
  return cfg_.drop_last ? (samples_.size() / cfg_.batch_size) * cfg_.batch_size : samples_.size();
}

bool Loader::forked() const { return ::getpid() != pid_; }

void Loader::check_process() const {
  if (!forked()) return;
  throw std::runtime_error("this Loader was made in process " + std::to_string(pid_) +
                           " and cannot be used in a process forked from it (its worker threads do not exist here): "
                           "make the Loader in this process (multiprocessing: the 'spawn' or 'forkserver' start method)");
}

LoaderState Loader::state() const {
  check_process();
  std::lock_guard<std::mutex> lock(mu_);
  return state_;
}

void Loader::set_state(const LoaderState& s) {
  if (s.epoch < 0 || s.index < 0 || s.index > samples_.size()) {
    std::ostringstream msg;
    msg << "loader state out of range: epoch " << s.epoch << ", index " << s.index << " (epoch has "
        << samples_.size() << " samples)";
    throw std::invalid_argument(msg.str());
  }
  check_process();
  std::lock_guard<std::mutex> lock(mu_);
  drop_pipeline_locked();
  state_ = s;
  cfg_.seed = s.seed;
  start_epoch_locked();
  state_.index = s.index;
  scheduled_ = s.index;
}

void Loader::start_epoch_locked() {
  const int64_t n = samples_.size();
  auto order = std::make_shared<std::vector<int64_t>>(n);
  std::vector<int64_t>& o = *order;
  const uint64_t seed = state_.seed, epoch = static_cast<uint64_t>(state_.epoch);
  if (cfg_.balanced && n > 0) {
    // Liu et al.: pick the class with probability 1/2, then a window of that class uniformly.
    for (int64_t k = 0; k < n; ++k) {
      const int cls = static_cast<int>(hash64(seed, kBalancedClass, epoch, k) & 1);
      const auto& members = class_members_[cls];
      o[k] = members[bounded(hash64(seed, kBalancedPick, epoch, k), members.size())];
    }
  } else {
    std::iota(o.begin(), o.end(), int64_t{0});
    if (cfg_.shuffle) {
      for (int64_t i = n - 1; i > 0; --i) {  // Fisher-Yates, one keyed draw per step
        std::swap(o[i], o[bounded(hash64(seed, kShuffle, epoch, i), static_cast<uint64_t>(i + 1))]);
      }
    }
  }
  order_ = std::move(order);
  state_.index = 0;
  scheduled_ = 0;
  check_identity_ = true;
}

void Loader::check_slides_unchanged_locked() {
  // Once per epoch, before its first batch is scheduled (nothing is in flight then): blocks and tiles
  // cached from a file that has since been replaced must not reach the new epoch's batches.
  if (!check_identity_) return;
  for (const auto& slot : slides_) slot->slide->check_unchanged();  // throws SlideChanged; retried next call
  check_identity_ = false;
}

std::shared_ptr<Slide> Loader::slide(int32_t s) const {
  const SlideSlot& slot = *slides_[s];
  std::lock_guard<std::mutex> lock(slot.mu);
  return slot.slide;
}

void Loader::replace_dead(int32_t s, const std::shared_ptr<Slide>& dead, std::shared_ptr<Slide> fresh) const {
  SlideSlot& slot = *slides_[s];
  {
    std::lock_guard<std::mutex> lock(slot.mu);
    if (slot.slide != dead || !dead->failed()) return;  // another worker replaced it already
  }
  if (!fresh || fresh->failed()) fresh = std::make_shared<Slide>(dead->path(), cache_, slot.jpeg_tiles);
  if (fresh->identity() != dead->identity()) throw_changed(*dead);
  std::lock_guard<std::mutex> lock(slot.mu);
  if (slot.slide == dead) slot.slide = std::move(fresh);
}

void Loader::drop_pipeline_locked() {
  // Workers hold their own reference to a Pending, so dropping it here is safe; the tasks still
  // queued for it are discarded.
  tasks_.clear();
  pending_.clear();
  done_cv_.notify_all();  // a consumer waiting on a dropped batch starts over
}

void Loader::fill_pipeline_locked() {
  const int64_t end = epoch_end();
  while (pending_.size() < prefetch_ && scheduled_ < end && !stopping_) {
    auto p = std::make_shared<Pending>();
    p->seed = state_.seed;
    p->epoch = state_.epoch;
    p->start = scheduled_;
    p->order = order_;
    const int64_t size = std::min(cfg_.batch_size, samples_.size() - scheduled_);
    p->count = size;
    if (cfg_.skip_errors) p->skip.resize(static_cast<size_t>(size));
    Batch& b = p->batch;
    b.size = size;
    b.towers = static_cast<int64_t>(cfg_.levels.size());
    b.window = cfg_.window;
    b.dtype = cfg_.out_dtype;
    b.images.resize(static_cast<size_t>(size * b.towers * b.window * b.window * 3 * out_itemsize(b.dtype)));
    b.labels.resize(size);
    b.coords.resize(2 * size);
    b.slide_index.resize(size);
    b.sample_index.resize(size);
    for (int64_t k = 0; k < size; ++k) {
      const int64_t i = (*order_)[scheduled_ + k];
      const int32_t s = samples_.slide[i];
      const double d0 = geometry_[s].downsample[0];
      b.sample_index[k] = i;
      b.slide_index[k] = s;
      b.labels[k] = samples_.label[i];
      b.coords[2 * k] = std::llround(static_cast<double>(samples_.x[i]) * d0);
      b.coords[2 * k + 1] = std::llround(static_cast<double>(samples_.y[i]) * d0);
    }
    for (int64_t c = 0; c < size; c += chunk_) {
      const int64_t e = std::min(size, c + chunk_);
      ++p->remaining;
      tasks_.emplace_back([this, p, c, e] { run_chunk(p, c, e); });
    }
    pending_.push_back(p);
    scheduled_ += size;
  }
  work_cv_.notify_all();
}

void Loader::worker_loop() {
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [this] { return stopping_ || !tasks_.empty(); });
      if (stopping_) return;
      task = std::move(tasks_.front());
      tasks_.pop_front();
    }
    task();
  }
}

void Loader::run_chunk(const std::shared_ptr<Pending>& p, int64_t begin, int64_t end) {
  std::exception_ptr error;
  try {
    // A sample whose block another worker is decoding waits for the end of the chunk rather than
    // for that worker. Why: chunks of one batch are adjacent runs of the grid, so a worker starting
    // chunk c + 2 asks for the blocks chunk c + 1 is decoding at its end; those waits were ~5-10% of
    // a cold grid epoch at 2 threads, and more with short chunks on many threads.
    std::vector<int64_t> deferred;
    BlockMemo memo;
    for (int64_t k = begin; k < end && !stopping_; ++k) {
      if (!extract_sample(*p, k, true, memo)) deferred.push_back(k);
    }
    for (int64_t k : deferred) {
      if (stopping_) break;
      extract_sample(*p, k, false, memo);
    }
    // Every slide this chunk read is still the file it opened: a file replaced before this point may
    // have served pixels of either file (OpenSlide opens more file handles as it needs them), so the
    // chunk fails; one replaced after it cannot have served any.
    const std::vector<int32_t>& si = p->batch.slide_index;
    for (int64_t k = begin; k < end; ++k) {
      if (std::find(si.begin() + begin, si.begin() + k, si[k]) == si.begin() + k) slide(si[k])->check_unchanged();
    }
  } catch (...) {
    error = std::current_exception();
  }
  std::lock_guard<std::mutex> lock(mu_);
  // Moved, not copied: once the consumer may see the exception this thread holds no reference to
  // it, so it is freed where it was last used (exception_ptr's count lives in libstdc++, where
  // ThreadSanitizer cannot see it order our last use before the consumer's).
  if (error && !p->error) p->error = std::move(error);
  if (--p->remaining == 0) done_cv_.notify_all();
}

bool Loader::cut_window(int32_t s, size_t t, int64_t x, int64_t y, uint8_t* dst, bool may_defer,
                        BlockMemo& memo) const {
  const int64_t w = cfg_.window;
  const SlideGeometry& g = geometry_[s];
  const TowerPlacement p = place_tower(x, y, w, g.downsample[0], g.downsample[t], t == 0);
  if (g.blocks || g.region[t]) return assemble(s, t, p.lx, p.ly, dst, may_defer, memo);
  slide(s)->read_rgb(p.x0, p.y0, cfg_.levels[t], w, w, dst, w * 3);
  return true;
}

// After a failed read: the verdict on this window comes from a fresh handle of its own (the shared
// one may have died of another window's corrupt tile, in another thread), reading just the window, so
// whether a sample fails depends on its pixels only, never on timing. The dead shared handle is
// replaced either way. Throws SlideChanged (file deleted or replaced) or SlideReadError with the sample.
void Loader::cut_window_fresh(int32_t s, size_t t, int64_t x, int64_t y, uint8_t* dst, int64_t sample) const {
  const std::shared_ptr<Slide> shared = slide(s);
  shared->check_unchanged();
  auto fresh = std::make_shared<Slide>(shared->path(), cache_, slides_[s]->jpeg_tiles);
  if (fresh->identity() != shared->identity()) throw_changed(*shared);  // replaced just now
  const int64_t w = cfg_.window;
  const SlideGeometry& g = geometry_[s];
  const TowerPlacement p = place_tower(x, y, w, g.downsample[0], g.downsample[t], t == 0);
  try {
    fresh->read_rgb(p.x0, p.y0, cfg_.levels[t], w, w, dst, w * 3);
  } catch (const SlideReadError& e) {
    replace_dead(s, shared, nullptr);
    std::ostringstream msg;
    msg << e.what() << " (sample " << sample << ", tower " << t << ")";
    throw SlideReadError(msg.str());
  }
  replace_dead(s, shared, std::move(fresh));
}

// False when the sample was deferred (may_defer and a block it needs is being decoded); it is then
// extracted again from scratch.
bool Loader::extract_sample(Pending& pending, int64_t k, bool may_defer, BlockMemo& memo) {
  // Each chunk writes only its own samples' slots of `pending.batch`.
  Batch& b = pending.batch;
  const int64_t w = cfg_.window, pixels = w * w * 3;
  const int64_t i = b.sample_index[k];
  const int32_t s = samples_.slide[i];
  const bool plain = !cfg_.augment && b.dtype == OutDtype::kUint8;
  AugmentParams params;  // identity unless augmenting
  if (cfg_.augment) {
    // Keyed by the position in the epoch, so a window drawn twice (balanced sampling) is augmented
    // independently, and nothing depends on threads or batch boundaries.
    params = draw_params(*cfg_.augment, pending.seed, static_cast<uint64_t>(pending.epoch),
                         static_cast<uint64_t>(pending.start + k));
  }
  thread_local std::vector<uint8_t> window;
  for (size_t t = 0; t < cfg_.levels.size(); ++t) {
    uint8_t* dst = b.images.data() + (k * b.towers + static_cast<int64_t>(t)) * pixels * out_itemsize(b.dtype);
    uint8_t* cut = dst;
    if (!plain) {
      window.resize(static_cast<size_t>(pixels));
      cut = window.data();
    }
    try {
      if (!cut_window(s, t, samples_.x[i], samples_.y[i], cut, may_defer, memo)) return false;
    } catch (const SlideReadError&) {
      try {
        cut_window_fresh(s, t, samples_.x[i], samples_.y[i], cut, i);
      } catch (const SlideReadError& e) {
        if (!cfg_.skip_errors) throw;
        pending.skip[k] = e.what();
        return true;
      }
    }
    if (!plain) augment_image(cut, w, params, b.dtype, dst);  // both towers share `params`
  }
  return true;
}

namespace {
int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
}  // namespace

bool Loader::assemble(int32_t s, size_t t, int64_t lx, int64_t ly, uint8_t* dst, bool may_defer,
                      BlockMemo& memo) const {
  const int64_t B = geometry_[s].block[t];
  const int64_t w = cfg_.window;
  const int32_t level = cfg_.levels[t];
  const std::shared_ptr<Slide> direct = geometry_[s].region[t] ? slide(s) : nullptr;
  for (int64_t by = floor_div(ly, B); by <= floor_div(ly + w - 1, B); ++by) {
    for (int64_t bx = floor_div(lx, B); bx <= floor_div(lx + w - 1, B); ++bx) {
      const int64_t x_lo = std::max(lx, bx * B), x_hi = std::min(lx + w, (bx + 1) * B);
      const int64_t y_lo = std::max(ly, by * B), y_hi = std::min(ly + w, (by + 1) * B);
      if (direct) {  // just this window's part of the tile, straight into the window
        direct->read_block_region(level, bx, by, B, x_lo - bx * B, y_lo - by * B, x_hi - x_lo, y_hi - y_lo,
                                  dst + ((y_lo - ly) * w + (x_lo - lx)) * 3, w * 3);
        continue;
      }
      const BlockKey key{s, level, bx, by};
      const BlockCache::Block* block = nullptr;
      for (size_t m = 0; m < BlockMemo::kSlots && !block; ++m) {
        if (memo.block[m] && memo.key[m] == key) block = memo.block[m].get();
      }
      if (!block) {
        // Integral downsample: level pixel (bx * B) sits exactly at level-0 bx * B * d_t.
        auto got = blocks_->get(key, BlockCache::block_bytes(B),
                                [&](uint8_t* d) { slide(s)->read_block(level, bx, by, B, d); }, !may_defer);
        if (!got) return false;  // another worker is decoding it
        block = got.get();
        memo.key[memo.next] = key;
        memo.block[memo.next] = std::move(got);
        memo.next = (memo.next + 1) % BlockMemo::kSlots;
      }
      for (int64_t y = y_lo; y < y_hi; ++y) {
        std::memcpy(dst + ((y - ly) * w + (x_lo - lx)) * 3, block->data() + ((y - by * B) * B + (x_lo - bx * B)) * 3,
                    static_cast<size_t>((x_hi - x_lo) * 3));
      }
    }
  }
  return true;
}

bool Loader::can_cut_tile_parts(size_t s, size_t t) const {
  const SlideGeometry& g = geometry_[s];
  return cfg_.tile_regions && g.exact && g.jpeg[t] && slide(static_cast<int32_t>(s))->jpeg_regions(cfg_.levels[t]);
}

void Loader::choose_block_policy() {
  // Blocks need integral downsamples. In grid order they always pay (neighbouring windows share
  // blocks while they are hot). In random order, per tower level, from the smallest working set up
  // (the blocks the epoch can touch, over all slides): a level whose blocks fit what the cache has
  // left is cached; one that mostly would not, but whose JPEG tiles decode in parts, cuts windows
  // straight from their part of each tile. Why half: a part costs ~0.5x a whole tile's decode (80 px
  // windows 0.46x, 299 px 0.54x on 256 px tiles), so caching pays only where at least about half
  // the lookups would hit, about capacity / working set for uniformly shuffled windows. What is still
  // cached then uses blocks read through OpenSlide only when they all fit (else one read per window).
  for (auto& g : geometry_) g.region.assign(cfg_.levels.size(), false);
  if (!blocks_) {
    // No block cache (cache_mb=0): JPEG towers with checked tile parts cut every window from them, in
    // any order (~2x OpenSlide's read_region per window); the others read each window through OpenSlide.
    for (size_t s = 0; s < geometry_.size(); ++s) {
      SlideGeometry& g = geometry_[s];
      for (size_t t = 0; t < cfg_.levels.size(); ++t) {
        g.region[t] = can_cut_tile_parts(s, t);
      }
    }
    return;
  }
  const bool random_access = cfg_.shuffle || cfg_.balanced;
  const size_t n_slides = slides_.size(), towers = cfg_.levels.size();
  std::vector<size_t> working_set(n_slides * towers, 0);  // per (slide, tower), bytes
  if (random_access) {
    std::vector<int64_t> lo_x(n_slides * towers, INT64_MAX), lo_y(lo_x), hi_x(n_slides * towers, INT64_MIN), hi_y(hi_x);
    for (int64_t i = 0; i < samples_.size(); ++i) {
      const int32_t s = samples_.slide[i];
      const SlideGeometry& g = geometry_[s];
      for (size_t t = 0; t < towers; ++t) {
        const TowerPlacement p = place_tower(samples_.x[i], samples_.y[i], cfg_.window, g.downsample[0], g.downsample[t], t == 0);
        const size_t j = s * towers + t;
        lo_x[j] = std::min(lo_x[j], p.lx), lo_y[j] = std::min(lo_y[j], p.ly);
        hi_x[j] = std::max(hi_x[j], p.lx + cfg_.window), hi_y[j] = std::max(hi_y[j], p.ly + cfg_.window);
      }
    }
    for (size_t j = 0; j < lo_x.size(); ++j) {  // bounding box of each (slide, tower), in blocks
      if (lo_x[j] > hi_x[j]) continue;
      const int64_t B = geometry_[j / towers].block[j % towers];
      const int64_t nx = floor_div(hi_x[j] - 1, B) - floor_div(lo_x[j], B) + 1;
      const int64_t ny = floor_div(hi_y[j] - 1, B) - floor_div(lo_y[j], B) + 1;
      working_set[j] = static_cast<size_t>(nx * ny) * BlockCache::block_bytes(B);
    }
    // Per tower level: the working set of the slides whose tower can go either way (JPEG tiles with
    // checked regions), and of those that can only be cached.
    std::vector<size_t> flexible(towers, 0), fixed(towers, 0);
    std::vector<bool> can_region(n_slides * towers, false);
    for (size_t j = 0; j < working_set.size(); ++j) {
      can_region[j] = can_cut_tile_parts(j / towers, j % towers);
      (can_region[j] ? flexible : fixed)[j % towers] += working_set[j];
    }
    size_t left = blocks_->capacity();
    for (size_t t = 0; t < towers; ++t) left -= std::min(left, fixed[t]);
    std::vector<size_t> by_size(towers);
    std::iota(by_size.begin(), by_size.end(), size_t{0});
    std::stable_sort(by_size.begin(), by_size.end(), [&](size_t a, size_t b) { return flexible[a] < flexible[b]; });
    for (size_t t : by_size) {
      if (flexible[t] == 0) continue;
      if (2 * left >= flexible[t]) {  // cached: at least about half the lookups hit
        left -= std::min(left, flexible[t]);
        continue;
      }
      for (size_t s = 0; s < n_slides; ++s) {
        if (can_region[s * towers + t]) {
          geometry_[s].region[t] = true;
          working_set[s * towers + t] = 0;  // takes no cache
        }
      }
    }
  }
  size_t cached = 0;
  for (size_t b : working_set) cached += b;
  const bool fits = !random_access || cached <= blocks_->capacity();
  for (auto& g : geometry_) {
    // Blocks that are JPEG tiles decoded straight from the file pay even when they thrash: a miss
    // decodes the tile, as OpenSlide's own tile cache would on its (more frequent) misses, and a hit
    // is a memcpy instead of read_region's compositing.
    const bool all_jpeg = std::all_of(g.jpeg.begin(), g.jpeg.end(), [](bool j) { return j; });
    g.blocks = g.exact && (fits || all_jpeg);
  }
}

std::optional<Batch> Loader::take() {
  std::optional<Batch> out;
  take_until(std::nullopt, out);
  return out;
}

bool Loader::take_for(std::chrono::milliseconds timeout, std::optional<Batch>& out) {
  return take_until(std::chrono::steady_clock::now() + timeout, out);
}

bool Loader::take_until(std::optional<std::chrono::steady_clock::time_point> deadline, std::optional<Batch>& out) {
  check_process();
  std::unique_lock<std::mutex> lock(mu_);
  std::shared_ptr<Pending> front;
  for (;;) {
    if (stopping_) throw std::runtime_error("loader is closed");
    check_slides_unchanged_locked();
    fill_pipeline_locked();
    if (pending_.empty()) {  // the epoch is over: the next call starts the next one
      state_.epoch += 1;
      start_epoch_locked();
      out.reset();
      return true;
    }
    front = pending_.front();
    // Another consumer thread may take this batch (or drop the pipeline) while this one waits: then
    // start over with the new front rather than pop a batch that is not this one's.
    auto ready = [&] { return stopping_ || front->done() || pending_.empty() || pending_.front() != front; };
    if (!deadline) {
      done_cv_.wait(lock, ready);
    } else if (!done_cv_.wait_until(lock, *deadline, ready)) {
      return false;  // nothing taken: the caller checks its signals and comes back
    }
    if (stopping_) throw std::runtime_error("loader is closed");
    if (!pending_.empty() && pending_.front() == front) break;
  }
  if (front->error) {
    drop_pipeline_locked();  // a retry starts again at the failed batch
    scheduled_ = state_.index;
    // Taken out of the batch, so this thread holds the exception's last reference: a worker still
    // finishing a chunk of the dropped batch never frees it under the consumer.
    std::exception_ptr error = std::exchange(front->error, nullptr);
    std::rethrow_exception(error);
  }
  pending_.pop_front();
  done_cv_.notify_all();  // another consumer waiting on this batch moves on to the next
  state_.index = front->start + front->count;
  fill_pipeline_locked();
  lock.unlock();
  Batch& b = front->batch;
  if (!front->skip.empty()) {  // drop the skipped samples, keeping the order of the others
    const int64_t img = b.towers * b.window * b.window * 3 * out_itemsize(b.dtype);
    int64_t kept = 0;
    for (int64_t k = 0; k < b.size; ++k) {
      if (!front->skip[k].empty()) {
        b.skipped.push_back({b.sample_index[k], b.slide_index[k], b.coords[2 * k], b.coords[2 * k + 1],
                             std::move(front->skip[k])});
        continue;
      }
      if (kept != k) {
        std::memmove(b.images.data() + kept * img, b.images.data() + k * img, static_cast<size_t>(img));
        b.labels[kept] = b.labels[k];
        b.coords[2 * kept] = b.coords[2 * k];
        b.coords[2 * kept + 1] = b.coords[2 * k + 1];
        b.slide_index[kept] = b.slide_index[k];
        b.sample_index[kept] = b.sample_index[k];
      }
      ++kept;
    }
    if (kept != b.size) {
      b.size = kept;
      b.images.resize(static_cast<size_t>(kept * img));
      b.labels.resize(kept);
      b.coords.resize(2 * kept);
      b.slide_index.resize(kept);
      b.sample_index.resize(kept);
    }
  }
  out = std::move(b);
  return true;
}

}  // namespace wsitile
