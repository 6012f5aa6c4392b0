// Argument conversions shared by the binding files (Python objects -> core types).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "wsitile/augment.hpp"

namespace wsitile_py {

namespace py = pybind11;

// A 1-d array of exactly n elements, converted to T, copied out.
template <typename T>
std::vector<T> column(const py::array& a, const char* name, py::ssize_t n) {
  auto arr = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(a);
  if (!arr || arr.ndim() != 1 || arr.shape(0) != n) {
    throw std::invalid_argument(std::string(name) + " must be a 1-d array of length " + std::to_string(n));
  }
  return std::vector<T>(arr.data(), arr.data() + n);
}

// wsitile.AugmentConfig as `dataclasses.astuple` gives it: (orientation, colour, brightness,
// saturation_lo, saturation_hi, hue, contrast_lo, contrast_hi).
inline wsitile::AugmentConfig augment_config(const py::tuple& a) {
  if (a.size() != 8) throw std::invalid_argument("augment: expected the 8 fields of wsitile.AugmentConfig");
  wsitile::AugmentConfig c;
  c.orientation = a[0].cast<bool>();
  c.colour = a[1].cast<bool>();
  c.brightness = a[2].cast<float>();
  c.saturation_lo = a[3].cast<float>();
  c.saturation_hi = a[4].cast<float>();
  c.hue = a[5].cast<float>();
  c.contrast_lo = a[6].cast<float>();
  c.contrast_hi = a[7].cast<float>();
  return c;
}

inline wsitile::OutDtype parse_out_dtype(const std::string& s) {
  if (s == "uint8") return wsitile::OutDtype::kUint8;
  if (s == "float32") return wsitile::OutDtype::kFloat32;
  if (s == "inception") return wsitile::OutDtype::kInception;
  throw std::invalid_argument("out_dtype must be 'uint8', 'float32' or 'inception', got '" + s + "'");
}

}  // namespace wsitile_py
