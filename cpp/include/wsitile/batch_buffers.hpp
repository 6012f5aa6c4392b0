// Memory for batch images: left uninitialised, and recycled across batches.
//
// Why: a default batch is 2.5 MB (64 pairs of 80 px; 34 MB at 299 px). Value-initialising it was a
// memset on the thread that schedules batches, under the loader's lock, and glibc hands blocks that
// size back to the kernel when they are freed (heap trimming, or munmap above its mmap threshold):
// the next batch's pages then fault one by one in the workers' window copies, each zeroed by the
// kernel first (~1,500 faults per cold epoch of the benchmark slide, the bulk of all). Workers write
// every byte of a batch, so neither the zeroing nor fresh pages buy anything.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace wsitile {

// Process-wide free lists of large byte buffers, by exact size (a loader's batches share one size, bar
// an epoch's last). Keeps at most kMaxKept buffers and kMaxBytes in all; the rest go back to the heap.
namespace batch_buffers {
constexpr size_t kMinPooled = size_t{256} << 10;  // smaller ones come from the heap's free lists anyway
void* take(size_t bytes);                          // operator new when none is kept
void give(void* p, size_t bytes) noexcept;
}  // namespace batch_buffers

// std::allocator with both properties: resize() leaves the bytes uninitialised, and buffers of at
// least kMinPooled bytes come from (and return to) batch_buffers. Stateless, so vectors of it move
// and swap freely (a batch's vector moves into the NumPy array's owner).
template <typename T>
struct BatchAllocator {
  using value_type = T;
  BatchAllocator() = default;
  template <typename U>
  BatchAllocator(const BatchAllocator<U>&) noexcept {}

  T* allocate(size_t n) {
    if (n > SIZE_MAX / sizeof(T)) throw std::bad_array_new_length();
    const size_t bytes = n * sizeof(T);
    if (bytes >= batch_buffers::kMinPooled) return static_cast<T*>(batch_buffers::take(bytes));
    return static_cast<T*>(::operator new(bytes));
  }
  void deallocate(T* p, size_t n) noexcept {
    const size_t bytes = n * sizeof(T);
    if (bytes >= batch_buffers::kMinPooled) {
      batch_buffers::give(p, bytes);
    } else {
      ::operator delete(p);
    }
  }
  template <typename U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;  // default-, not value-initialised: no zeroing
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  template <typename U>
  bool operator==(const BatchAllocator<U>&) const noexcept {
    return true;
  }
  template <typename U>
  bool operator!=(const BatchAllocator<U>&) const noexcept {
    return false;
  }
};

using ImageBytes = std::vector<uint8_t, BatchAllocator<uint8_t>>;

}  // namespace wsitile
