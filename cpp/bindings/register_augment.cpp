// Python bindings of the augmentation kernel: a batch entry point (GIL released, samples in parallel)
// and the counter-based parameter draw. Argument checking with readable messages is done in
// python/wsitile/augment.py; the checks here only guard memory safety.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "convert.hpp"
#include "numpy_owner.hpp"
#include "wsitile/augment.hpp"
#include "wsitile/parallel.hpp"

namespace py = pybind11;
using wsitile::bindings::to_numpy;

namespace {

template <typename T>
py::array run_batch(const uint8_t* src, const std::vector<wsitile::AugmentParams>& params, int64_t towers,
                    int64_t h, int64_t w, wsitile::OutDtype out, int threads, std::vector<py::ssize_t> shape) {
  const int64_t n = static_cast<int64_t>(params.size());
  const int64_t img = h * w * 3;
  // NumPy allocates (uninitialised, owned by the array) with the GIL held; the workers only fill it.
  py::array_t<T> result(std::move(shape));
  T* d = result.mutable_data();
  {
    py::gil_scoped_release release;
    wsitile::parallel_for(n, threads, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        for (int64_t t = 0; t < towers; ++t) {
          const int64_t k = i * towers + t;
          wsitile::augment_image(src + k * img, h, w, params[i], out, d + k * img);
        }
      }
    });
  }
  return std::move(result);
}

}  // namespace

void register_augment(py::module_& m) {
  m.def(
      "augment_batch",
      [](const py::array& images, const py::array& rot90, const py::array& flip, const py::array& brightness,
         const py::array& saturation, const py::array& hue, const py::array& contrast, const std::string& out_dtype,
         int threads) {
        const wsitile::OutDtype out = wsitile_py::parse_out_dtype(out_dtype);
        auto img = py::array_t<uint8_t, py::array::c_style>::ensure(images);
        if (!img || !(img.ndim() == 4 || img.ndim() == 5) || img.shape(img.ndim() - 1) != 3) {
          throw std::invalid_argument("images must be a C-contiguous uint8 array (N, [T,] H, W, 3)");
        }
        const bool towered = img.ndim() == 5;
        const py::ssize_t n = img.shape(0), towers = towered ? img.shape(1) : 1;
        const py::ssize_t h = img.shape(img.ndim() - 3), w = img.shape(img.ndim() - 2);
        const auto r = wsitile_py::column<int32_t>(rot90, "rot90", n);
        const auto f = wsitile_py::column<uint8_t>(flip, "flip", n);
        const auto b = wsitile_py::column<float>(brightness, "brightness", n);
        const auto s = wsitile_py::column<float>(saturation, "saturation", n);
        const auto hu = wsitile_py::column<float>(hue, "hue", n);
        const auto c = wsitile_py::column<float>(contrast, "contrast", n);
        std::vector<wsitile::AugmentParams> params(static_cast<size_t>(n));
        bool odd = false;
        for (py::ssize_t i = 0; i < n; ++i) {
          if (r[i] < 0 || r[i] > 3) throw std::invalid_argument("rot90 values must be in 0..3");
          params[i] = {r[i], f[i] != 0, b[i], s[i], hu[i], c[i]};
          odd = odd || (r[i] & 1);
        }
        if (odd && h != w) throw std::invalid_argument("rot90 must be even for non-square images");
        const py::ssize_t oh = odd ? w : h, ow = odd ? h : w;
        std::vector<py::ssize_t> shape{n};
        if (towered) shape.push_back(towers);
        shape.insert(shape.end(), {oh, ow, 3});
        if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
        if (out == wsitile::OutDtype::kUint8) return run_batch<uint8_t>(img.data(), params, towers, h, w, out, threads, shape);
        return run_batch<float>(img.data(), params, towers, h, w, out, threads, shape);
      },
      py::arg("images"), py::arg("rot90"), py::arg("flip"), py::arg("brightness"), py::arg("saturation"),
      py::arg("hue"), py::arg("contrast"), py::arg("out_dtype"), py::arg("threads"));

  m.def("augment_kernel_isa", &wsitile::augment_kernel_isa,
        "Which build of the augmentation kernel runs here: 'avx512', 'avx2' (AVX2 + FMA) or 'base'.");

  m.def(
      "augment_draw_params",
      [](const py::tuple& config, uint64_t seed, uint64_t epoch, const py::array& sample_indices) {
        const wsitile::AugmentConfig cfg = wsitile_py::augment_config(config);
        auto idx = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(sample_indices);
        if (!idx || idx.ndim() != 1) throw std::invalid_argument("sample_indices must be a 1-d integer array");
        const py::ssize_t n = idx.shape(0);
        std::vector<int32_t> rot(n);
        std::vector<uint8_t> flip(n);
        std::vector<float> b(n), s(n), h(n), c(n);
        const uint64_t* ip = idx.data();
        for (py::ssize_t i = 0; i < n; ++i) {
          const auto p = wsitile::draw_params(cfg, seed, epoch, ip[i]);
          rot[i] = p.rot90;
          flip[i] = p.flip;
          b[i] = p.brightness;
          s[i] = p.saturation;
          h[i] = p.hue;
          c[i] = p.contrast;
        }
        py::dict d;
        d["rot90"] = to_numpy(std::move(rot), {n});
        d["flip"] = to_numpy(std::move(flip), {n}).attr("view")("bool");
        d["brightness"] = to_numpy(std::move(b), {n});
        d["saturation"] = to_numpy(std::move(s), {n});
        d["hue"] = to_numpy(std::move(h), {n});
        d["contrast"] = to_numpy(std::move(c), {n});
        return d;
      },
      py::arg("config"), py::arg("seed"), py::arg("epoch"), py::arg("sample_indices"),
      "The loader's augmentation parameters for these sample indices; `config` is\n"
      "dataclasses.astuple(wsitile.AugmentConfig).");
}
