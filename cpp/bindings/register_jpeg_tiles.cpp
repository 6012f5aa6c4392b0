// wsitile._core.JpegTileLayout and libjpeg loading: the Python side (wsitile.jpeg_tiles) parses the
// TIFF with tifffile and hands the tile tables over; decoding stays in the core.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>

#include "convert.hpp"
#include "numpy_owner.hpp"
#include "wsitile/jpeg_tiles.hpp"

namespace py = pybind11;

void register_jpeg_tiles(py::module_& m) {
  using Layout = wsitile::JpegTileLayout;
  py::class_<Layout, std::shared_ptr<Layout>>(m, "JpegTileLayout",
                                              "The tiled JPEG pages of one TIFF file (see wsitile.jpeg_tiles).")
      .def(py::init([](const std::tuple<uint64_t, uint64_t, int64_t, int64_t>& identity, const py::list& pages) {
             auto layout = std::make_shared<Layout>();
             std::tie(layout->identity.dev, layout->identity.ino, layout->identity.size, layout->identity.mtime_ns) =
                 identity;
             for (const py::handle& item : pages) {
               const auto page = item.cast<py::tuple>();
               if (page.size() != 7) {
                 throw std::invalid_argument(
                     "page: expected (width, height, tile, ycbcr, offsets, bytecounts, jpegtables)");
               }
               wsitile::JpegTileLevel p;
               p.width = page[0].cast<int64_t>();
               p.height = page[1].cast<int64_t>();
               p.tile = page[2].cast<int32_t>();
               p.ycbcr = page[3].cast<bool>();
               if (p.width < 1 || p.height < 1 || p.tile < 1) throw std::invalid_argument("page: sizes must be positive");
               const py::ssize_t n = p.tiles_across() * p.tiles_down();
               p.offsets = wsitile_py::column<uint64_t>(page[4].cast<py::array>(), "offsets", n);
               p.bytecounts = wsitile_py::column<uint64_t>(page[5].cast<py::array>(), "bytecounts", n);
               const std::string tables = page[6].cast<py::bytes>();
               p.tables.assign(tables.begin(), tables.end());
               layout->pages.push_back(std::move(p));
             }
             return layout;
           }),
           py::arg("identity"), py::arg("pages"),
           "identity: (st_dev, st_ino, st_size, st_mtime_ns) of the file the pages were read from.")
      .def_property_readonly("page_sizes", [](const Layout& l) {
        std::vector<std::tuple<int64_t, int64_t, int32_t>> sizes;
        for (const auto& p : l.pages) sizes.emplace_back(p.width, p.height, p.tile);
        return sizes;
      });

  m.def("load_libjpeg", &wsitile::load_libjpeg, py::arg("path"),
        "Loads libjpeg (the 6.2 API, e.g. the libjpeg-turbo Pillow ships) for the direct JPEG tile path.");
  m.def("libjpeg_loaded", &wsitile::libjpeg_loaded);
  m.def(
      "read_jpeg_tile",
      [](const std::string& path, std::shared_ptr<Layout> layout, size_t page, int64_t col, int64_t row) {
        if (page >= layout->pages.size()) throw std::invalid_argument("page index out of range");
        const wsitile::JpegTileLevel& p = layout->pages[page];
        std::vector<uint8_t> rgb(static_cast<size_t>(p.tile) * p.tile * 3);
        {
          py::gil_scoped_release release;
          wsitile::JpegTileReader(path, layout).read_tile(p, col, row, rgb.data());
        }
        return wsitile::bindings::to_numpy(std::move(rgb), {p.tile, p.tile, 3});
      },
      py::arg("path"), py::arg("layout"), py::arg("page"), py::arg("col"), py::arg("row"),
      "Tile (col, row) of page `page` decoded straight from the file: uint8 (tile, tile, 3) RGB, white\n"
      "beyond the page's edge. For tests and diagnostics; the loader decodes through Slide.");
  m.def(
      "read_jpeg_tile_region",
      [](const std::string& path, std::shared_ptr<Layout> layout, size_t page, int64_t col, int64_t row, int64_t x,
         int64_t y, int64_t w, int64_t h) {
        if (page >= layout->pages.size()) throw std::invalid_argument("page index out of range");
        if (w < 1 || h < 1) throw std::invalid_argument("region must be at least 1x1");
        const wsitile::JpegTileLevel& p = layout->pages[page];
        std::vector<uint8_t> rgb(static_cast<size_t>(w) * static_cast<size_t>(h) * 3);
        {
          py::gil_scoped_release release;
          wsitile::JpegTileReader(path, layout).read_tile_region(p, col, row, x, y, w, h, rgb.data(), w * 3);
        }
        return wsitile::bindings::to_numpy(std::move(rgb), {h, w, 3});
      },
      py::arg("path"), py::arg("layout"), py::arg("page"), py::arg("col"), py::arg("row"), py::arg("x"), py::arg("y"),
      py::arg("w"), py::arg("h"),
      "Pixels [x, x + w) x [y, y + h) of tile (col, row) of page `page`, decoded from only the part of the\n"
      "tile they need: uint8 (h, w, 3), equal to read_jpeg_tile's pixels there. For tests and diagnostics.");
}
