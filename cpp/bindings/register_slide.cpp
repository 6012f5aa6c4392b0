#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "numpy_owner.hpp"
#include "wsitile/jpeg_tiles.hpp"
#include "wsitile/mask.hpp"
#include "wsitile/slide.hpp"

namespace py = pybind11;
using wsitile::bindings::to_numpy;

void register_slide(py::module_& m) {
  m.def("load_openslide", &wsitile::load_openslide, py::arg("path"),
        "Load libopenslide from `path` (the library openslide-python uses).");
  m.def("openslide_loaded", &wsitile::openslide_loaded);
  m.def("openslide_version", [] { return std::string(wsitile::openslide_api().get_version()); });

  py::class_<wsitile::Slide>(m, "Slide")
      .def(py::init([](const std::string& path, const std::optional<std::shared_ptr<wsitile::JpegTileLayout>>& jpeg_tiles) {
             return std::make_unique<wsitile::Slide>(path, nullptr, jpeg_tiles.value_or(nullptr));
           }),
           py::arg("path"), py::arg("jpeg_tiles") = py::none(),
           "`jpeg_tiles`: the file's JpegTileLayout (wsitile.jpeg_tiles.tile_layout), for read_level's direct path.")
      .def_property_readonly("path", &wsitile::Slide::path)
      .def_property_readonly("vendor", &wsitile::Slide::vendor)
      .def_property_readonly("level_count", &wsitile::Slide::level_count)
      .def_property_readonly("level_dimensions",
                             [](const wsitile::Slide& s) {
                               std::vector<std::pair<int64_t, int64_t>> out;
                               for (const auto& l : s.levels()) out.emplace_back(l.width, l.height);
                               return out;
                             })
      .def_property_readonly("level_downsamples",
                             [](const wsitile::Slide& s) {
                               std::vector<double> out;
                               for (const auto& l : s.levels()) out.push_back(l.downsample);
                               return out;
                             })
      .def("property", &wsitile::Slide::property, py::arg("name"))
      .def(
          "read_region",
          [](const wsitile::Slide& s, std::pair<int64_t, int64_t> location, int32_t level,
             std::pair<int64_t, int64_t> size) {
            const auto [w, h] = size;
            if (w < 1 || h < 1) throw std::invalid_argument("read_region: size must be positive");
            s.level(level);
            wsitile::Slide::check_region(location.first, location.second, w, h);  // before allocating
            std::vector<uint8_t> rgb(static_cast<size_t>(w * h * 3));
            {
              py::gil_scoped_release release;  // pure C++ from here: no Python object is touched
              s.read_rgb(location.first, location.second, level, w, h, rgb.data(), w * 3);
            }
            return to_numpy(std::move(rgb), {h, w, 3});
          },
          py::arg("location"), py::arg("level"), py::arg("size"),
          "RGB uint8 (h, w, 3) of `level` at level-0 `location`; outside the slide is white.")
      .def(
          "read_level",
          [](const wsitile::Slide& s, int32_t level, int threads) {
            if (threads < 1) throw std::invalid_argument("read_level: threads must be >= 1");
            const auto& info = s.level(level);
            wsitile::Slide::check_region(0, 0, info.width, info.height);  // at most 2^32 pixels, before allocating
            std::vector<uint8_t> rgb(static_cast<size_t>(info.width * info.height * 3));
            {
              py::gil_scoped_release release;
              s.read_level(level, rgb.data(), threads);
            }
            return to_numpy(std::move(rgb), {info.height, info.width, 3});
          },
          py::arg("level"), py::arg("threads") = 1,
          "RGB uint8 (h, w, 3) of the whole `level`, JPEG tiles decoded on `threads` threads.");

  m.def(
      "mask_any",
      [](const wsitile::Slide& mask, py::array_t<int64_t, py::array::c_style | py::array::forcecast> rects,
         int threads) {
        if (rects.ndim() != 2 || rects.shape(1) != 4) throw std::invalid_argument("rects must be (N, 4)");
        if (threads < 1) throw std::invalid_argument("threads must be >= 1");
        const int64_t n = rects.shape(0);
        std::vector<int64_t> r(rects.data(), rects.data() + 4 * n);  // copied: workers never see Python
        std::vector<uint8_t> out(static_cast<size_t>(n));
        {
          py::gil_scoped_release release;
          wsitile::mask_any(mask, r.data(), n, out.data(), threads);
        }
        return to_numpy(std::move(out), {n});
      },
      py::arg("mask"), py::arg("rects"), py::arg("threads") = 1,
      "1 where the mask's level 0 has a non-zero pixel in the half-open level-0 rect (x0, y0, x1, y1).");
}
