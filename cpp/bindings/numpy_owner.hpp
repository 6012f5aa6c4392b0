// Zero-copy hand-off of C++ buffers to NumPy: the vector moves to the heap and a capsule, created
// before the array, owns it. The array never views memory that C++ reuses later.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <vector>

namespace wsitile::bindings {

template <typename T, typename Alloc>
pybind11::array_t<T> to_numpy(std::vector<T, Alloc>&& v, std::vector<pybind11::ssize_t> shape) {
  using Vector = std::vector<T, Alloc>;
  auto* owned = new Vector(std::move(v));
  pybind11::capsule owner(owned, [](void* p) { delete static_cast<Vector*>(p); });
  return pybind11::array_t<T>(std::move(shape), owned->data(), owner);
}

}  // namespace wsitile::bindings
