// Zero-copy hand-off of C++ buffers to NumPy: the vector moves to the heap and a capsule, created
// before the array, owns it. The array never views memory that C++ reuses later.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <type_traits>
#include <vector>

namespace wsitile::bindings {

// `View`: the array's element type when the vector holds its raw bytes (a float32 batch in a byte
// vector); by default the vector's own.
template <typename View = void, typename T, typename Alloc>
auto to_numpy(std::vector<T, Alloc>&& v, std::vector<pybind11::ssize_t> shape) {
  using Elem = std::conditional_t<std::is_void_v<View>, T, View>;
  using Vector = std::vector<T, Alloc>;
  auto* owned = new Vector(std::move(v));
  pybind11::capsule owner(owned, [](void* p) { delete static_cast<Vector*>(p); });
  return pybind11::array_t<Elem>(std::move(shape), reinterpret_cast<Elem*>(owned->data()), owner);
}

}  // namespace wsitile::bindings
