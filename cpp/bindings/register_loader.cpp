#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>

#include "convert.hpp"
#include "numpy_owner.hpp"
#include "wsitile/jpeg_tiles.hpp"
#include "wsitile/loader.hpp"

namespace py = pybind11;
using wsitile::bindings::to_numpy;

namespace {

py::dict batch_to_dict(wsitile::Batch&& b) {
  const py::ssize_t n = b.size;
  const std::vector<py::ssize_t> shape{n, b.towers, b.window, b.window, 3};
  py::dict d;
  if (b.dtype == wsitile::OutDtype::kUint8) {
    d["images"] = to_numpy(std::move(b.images), shape);
  } else {  // float32 bytes
    d["images"] = to_numpy<float>(std::move(b.images), shape);
  }
  d["labels"] = to_numpy(std::move(b.labels), {n});
  d["coords"] = to_numpy(std::move(b.coords), {n, 2});
  d["slide_index"] = to_numpy(std::move(b.slide_index), {n});
  d["sample_index"] = to_numpy(std::move(b.sample_index), {n});
  if (!b.skipped.empty()) {  // on_error="skip": what was left out, for the Python side to log
    py::list skipped;
    for (auto& r : b.skipped) {
      skipped.append(py::make_tuple(r.sample_index, r.slide, r.x0, r.y0, std::move(r.message)));
    }
    d["skipped"] = std::move(skipped);
  }
  return d;
}

}  // namespace

void register_loader(py::module_& m) {
  py::class_<wsitile::Loader>(m, "Loader")
      .def(py::init([](const std::vector<std::string>& slides, const py::array& slide_index, const py::array& x,
                       const py::array& y, const py::array& labels, const std::vector<int32_t>& levels,
                       int64_t window, int64_t batch_size, int threads, bool shuffle, bool balanced,
                       bool drop_last, uint64_t seed, size_t cache_bytes, std::optional<py::tuple> augment,
                       const std::string& out_dtype, size_t tile_cache_bytes, const std::string& on_error,
                       const std::vector<std::optional<std::shared_ptr<wsitile::JpegTileLayout>>>& jpeg_tiles,
                       bool tile_regions) {
             const py::ssize_t n = slide_index.size();
             wsitile::SampleTable t;
             t.slide = wsitile_py::column<int32_t>(slide_index, "slide_index", n);
             t.x = wsitile_py::column<int64_t>(x, "x", n);
             t.y = wsitile_py::column<int64_t>(y, "y", n);
             t.label = wsitile_py::column<uint8_t>(labels, "labels", n);
             wsitile::LoaderConfig cfg;
             cfg.levels = levels;
             cfg.window = window;
             cfg.batch_size = batch_size;
             cfg.threads = threads;
             cfg.shuffle = shuffle;
             cfg.balanced = balanced;
             cfg.drop_last = drop_last;
             cfg.seed = seed;
             cfg.cache_bytes = cache_bytes;
             cfg.tile_cache_bytes = tile_cache_bytes;
             cfg.tile_regions = tile_regions;
             if (on_error != "raise" && on_error != "skip") {
               throw std::invalid_argument("on_error must be 'raise' or 'skip', got '" + on_error + "'");
             }
             cfg.skip_errors = on_error == "skip";
             cfg.out_dtype = wsitile_py::parse_out_dtype(out_dtype);
             if (augment) cfg.augment = wsitile_py::augment_config(*augment);
             std::vector<std::shared_ptr<const wsitile::JpegTileLayout>> layouts;
             for (const auto& l : jpeg_tiles) layouts.push_back(l.value_or(nullptr));
             py::gil_scoped_release release;  // opening slides touches no Python object
             return std::make_unique<wsitile::Loader>(slides, std::move(t), cfg, std::move(layouts));
           }),
           py::arg("slides"), py::arg("slide_index"), py::arg("x"), py::arg("y"), py::arg("labels"),
           py::arg("levels"), py::arg("window"), py::arg("batch_size"), py::arg("threads"), py::arg("shuffle"),
           py::arg("balanced"), py::arg("drop_last"), py::arg("seed"), py::arg("cache_bytes"),
           py::arg("augment") = py::none(), py::arg("out_dtype") = "uint8",
           py::arg("tile_cache_bytes") = size_t{32} << 20, py::arg("on_error") = "raise",
           py::arg_v("jpeg_tiles", std::vector<std::optional<std::shared_ptr<wsitile::JpegTileLayout>>>{}, "[]"),
           py::arg("tile_regions") = true,
           "`jpeg_tiles`: empty, or one JpegTileLayout (or None) per slide: blocks of the levels it covers\n"
           "are decoded straight from the file's JPEG tiles once checked against OpenSlide. `tile_regions`:\n"
           "shuffled levels that would thrash the block cache decode each window's part of its tiles.")
      .def_property_readonly("num_samples", &wsitile::Loader::num_samples)
      .def_property_readonly("cache_bytes_used", &wsitile::Loader::cache_bytes_used)
      .def("uses_block_cache", &wsitile::Loader::uses_block_cache, py::arg("slide"))
      .def("decodes_jpeg_tiles", &wsitile::Loader::decodes_jpeg_tiles, py::arg("slide"), py::arg("tower"),
           "True when the tower's blocks are decoded straight from JPEG tiles rather than read through OpenSlide.")
      .def("decodes_tile_regions", &wsitile::Loader::decodes_tile_regions, py::arg("slide"), py::arg("tower"),
           "True when the tower's windows are decoded from just their part of each JPEG tile, uncached\n"
           "(shuffled epochs whose blocks would mostly miss the block cache).")
      .def_property_readonly("batches_per_epoch", &wsitile::Loader::batches_per_epoch)
      .def("get_state",
           [](const wsitile::Loader& l) {
             const auto s = l.state();
             py::dict d;
             d["seed"] = s.seed;
             d["epoch"] = s.epoch;
             d["index"] = s.index;
             return d;
           })
      .def(
          "set_state",
          [](wsitile::Loader& l, const py::dict& d) {
            wsitile::LoaderState s;
            s.seed = d["seed"].cast<uint64_t>();
            s.epoch = d["epoch"].cast<int64_t>();
            s.index = d["index"].cast<int64_t>();
            l.set_state(s);
          },
          py::arg("state"))
      .def("next",
           [](wsitile::Loader& l) -> py::object {
             // Wait in short slices with the GIL released, so Ctrl-C (a pending Python signal) is
             // noticed within ~50 ms instead of after a long batch.
             std::optional<wsitile::Batch> b;
             for (;;) {
               bool taken;
               {
                 py::gil_scoped_release release;
                 taken = l.take_for(std::chrono::milliseconds(50), b);
               }
               if (taken) break;
               if (PyErr_CheckSignals() != 0) throw py::error_already_set();
             }
             if (!b) return py::none();
             return batch_to_dict(std::move(*b));
           },
           "The next batch as a dict of NumPy arrays, or None at the end of an epoch. With on_error='skip'\n"
           "a batch may be shorter (even empty) and then has 'skipped': [(sample_index, slide_index, x0, y0,\n"
           "message)].")
      .def("close", &wsitile::Loader::close, py::call_guard<py::gil_scoped_release>());

  m.def(
      "place_tower",
      [](int64_t x, int64_t y, int64_t window, double d0, double dt, bool base) {
        const auto p = wsitile::place_tower(x, y, window, d0, dt, base);
        return py::make_tuple(p.lx, p.ly, p.x0, p.y0);
      },
      py::arg("x"), py::arg("y"), py::arg("window"), py::arg("d0"), py::arg("dt"), py::arg("base"));
}
