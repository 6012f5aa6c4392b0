#include "wsitile/loader.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <sstream>
#include <stdexcept>

#include "wsitile/rng.hpp"

namespace wsitile {

namespace {
// A grid-order run of windows is read as one strip per tower when it spans at most this many
// level-Lb pixels: one read_region instead of one per window, with a bounded strip buffer.
constexpr int64_t kMaxStrip = 4096;
}  // namespace

struct Loader::Pending {
  int64_t epoch = 0, start = 0;
  std::shared_ptr<const std::vector<int64_t>> order;
  Batch batch;
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

Loader::Loader(const std::vector<std::string>& slide_paths, SampleTable samples, LoaderConfig cfg)
    : cfg_(std::move(cfg)), samples_(std::move(samples)) {
  if (cfg_.levels.empty()) throw std::invalid_argument("levels: at least one tower level is needed");
  if (cfg_.window < 1) throw std::invalid_argument("window must be >= 1");
  if (cfg_.batch_size < 1) throw std::invalid_argument("batch_size must be >= 1");
  if (cfg_.threads < 1) throw std::invalid_argument("threads must be >= 1");
  const int64_t n = samples_.size();
  if (static_cast<int64_t>(samples_.x.size()) != n || static_cast<int64_t>(samples_.y.size()) != n ||
      static_cast<int64_t>(samples_.label.size()) != n) {
    throw std::invalid_argument("sample table columns differ in length");
  }
  if (cfg_.cache_bytes > 0 && openslide_api().cache_create) {
    cache_ = std::make_shared<TileCache>(cfg_.cache_bytes);
  }
  for (const auto& path : slide_paths) {
    slides_.push_back(std::make_unique<Slide>(path, cache_));
    const Slide& s = *slides_.back();
    SlideGeometry g;
    for (int32_t lvl : cfg_.levels) {
      const double d = s.level(lvl).downsample;  // throws naming the levels that exist
      g.downsample.push_back(d);
      g.exact = g.exact && d == std::floor(d);
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
    class_members_[samples_.label[i] ? 1 : 0].push_back(i);
  }
  if (cfg_.balanced && n > 0 && (class_members_[0].empty() || class_members_[1].empty())) {
    throw std::invalid_argument(std::string("balanced sampling needs tumour and normal windows, but there are no ") +
                                (class_members_[1].empty() ? "tumour" : "normal") + " windows");
  }
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
  for (int t = 0; t < cfg_.threads; ++t) workers_.emplace_back([this] { worker_loop(); });
}

Loader::~Loader() { close(); }

void Loader::close() {
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

LoaderState Loader::state() const {
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
}

void Loader::drop_pipeline_locked() {
  // Workers hold their own reference to a Pending, so dropping it here is safe; the tasks still
  // queued for it are discarded.
  tasks_.clear();
  pending_.clear();
}

void Loader::fill_pipeline_locked() {
  const int64_t end = epoch_end();
  while (pending_.size() < prefetch_ && scheduled_ < end && !stopping_) {
    auto p = std::make_shared<Pending>();
    p->epoch = state_.epoch;
    p->start = scheduled_;
    p->order = order_;
    const int64_t size = std::min(cfg_.batch_size, samples_.size() - scheduled_);
    Batch& b = p->batch;
    b.size = size;
    b.towers = static_cast<int64_t>(cfg_.levels.size());
    b.window = cfg_.window;
    b.images.resize(static_cast<size_t>(size * b.towers * b.window * b.window * 3));
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
    Batch& b = p->batch;
    // Split the chunk into runs of windows that lie side by side on one row of one slide.
    int64_t i = begin;
    while (i < end) {
      const int64_t first = b.sample_index[i];
      const int32_t s = samples_.slide[first];
      int64_t j = i + 1;
      if (geometry_[s].exact) {
        int64_t prev_x = samples_.x[first];
        while (j < end) {
          const int64_t q = b.sample_index[j];
          const int64_t x = samples_.x[q];
          if (samples_.slide[q] != s || samples_.y[q] != samples_.y[first] || x <= prev_x ||
              x - prev_x > cfg_.window || x + cfg_.window - samples_.x[first] > kMaxStrip) {
            break;
          }
          prev_x = x;
          ++j;
        }
      }
      extract_run(b, i, j);
      i = j;
      if (stopping_) break;  // close() was called: leave the rest of the chunk
    }
  } catch (...) {
    error = std::current_exception();
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (error && !p->error) p->error = error;
  if (--p->remaining == 0) done_cv_.notify_all();
}

void Loader::extract_run(Batch& b, int64_t first, int64_t last) const {
  const int64_t w = cfg_.window, towers = b.towers;
  const int64_t tower_bytes = w * w * 3;
  const int64_t i0 = b.sample_index[first];
  const int32_t s = samples_.slide[i0];
  const Slide& slide = *slides_[s];
  const SlideGeometry& g = geometry_[s];
  thread_local std::vector<uint8_t> strip;
  for (int64_t t = 0; t < towers; ++t) {
    const double d0 = g.downsample[0], dt = g.downsample[t];
    const int32_t level = cfg_.levels[t];
    if (last - first == 1) {  // a lone window: read straight into the batch
      const TowerPlacement p = place_tower(samples_.x[i0], samples_.y[i0], w, d0, dt, t == 0);
      slide.read_rgb(p.x0, p.y0, level, w, w, b.images.data() + (first * towers + t) * tower_bytes, w * 3);
      continue;
    }
    // One strip covering the run's windows on this tower (same row, exact downsample: each window is
    // the strip's columns [lx - strip_lx, +w), the same pixels a read of its own would give).
    const TowerPlacement a = place_tower(samples_.x[i0], samples_.y[i0], w, d0, dt, t == 0);
    const int64_t il = b.sample_index[last - 1];
    const TowerPlacement z = place_tower(samples_.x[il], samples_.y[il], w, d0, dt, t == 0);
    const int64_t strip_w = z.lx + w - a.lx;
    strip.resize(static_cast<size_t>(strip_w * w * 3));
    slide.read_rgb(a.x0, a.y0, level, strip_w, w, strip.data(), strip_w * 3);
    for (int64_t k = first; k < last; ++k) {
      const int64_t i = b.sample_index[k];
      const TowerPlacement p = place_tower(samples_.x[i], samples_.y[i], w, d0, dt, t == 0);
      uint8_t* dst = b.images.data() + (k * towers + t) * tower_bytes;
      const uint8_t* src = strip.data() + (p.lx - a.lx) * 3;
      for (int64_t r = 0; r < w; ++r) std::memcpy(dst + r * w * 3, src + r * strip_w * 3, w * 3);
    }
  }
}

bool Loader::wait(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  if (stopping_) throw std::runtime_error("loader is closed");
  fill_pipeline_locked();
  if (pending_.empty()) return true;  // end of epoch
  auto front = pending_.front();
  return done_cv_.wait_for(lock, timeout, [&] { return stopping_ || front->done(); });
}

std::optional<Batch> Loader::take() {
  std::unique_lock<std::mutex> lock(mu_);
  if (stopping_) throw std::runtime_error("loader is closed");
  fill_pipeline_locked();
  if (pending_.empty()) {  // the epoch is over: the next call starts the next one
    state_.epoch += 1;
    start_epoch_locked();
    return std::nullopt;
  }
  auto front = pending_.front();
  done_cv_.wait(lock, [&] { return stopping_ || front->done(); });
  if (stopping_) throw std::runtime_error("loader is closed");
  if (front->error) {
    drop_pipeline_locked();  // a retry starts again at the failed batch
    scheduled_ = state_.index;
    std::rethrow_exception(front->error);
  }
  pending_.pop_front();
  state_.index = front->start + front->batch.size;
  fill_pipeline_locked();
  return std::move(front->batch);
}

}  // namespace wsitile
