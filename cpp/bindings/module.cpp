// The _core extension: a thin pybind11 layer over the pure C++ engine in cpp/src.
#include <pybind11/pybind11.h>

#include "wsitile/slide.hpp"

namespace py = pybind11;

void register_slide(py::module_& m);
void register_loader(py::module_& m);
void register_augment(py::module_& m);
void register_jpeg_tiles(py::module_& m);

PYBIND11_MODULE(_core, m) {
  m.doc() = "wsitile's C++ engine (use the wsitile package, not this module)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const wsitile::FileNotFound& e) {
      PyErr_SetString(PyExc_FileNotFoundError, e.what());
    }
  });
  // A slide file deleted or replaced while in use: a RuntimeError callers can tell apart.
  py::register_exception<wsitile::SlideChanged>(m, "SlideChangedError", PyExc_RuntimeError);
  register_jpeg_tiles(m);  // before Slide and the Loader, whose signatures name JpegTileLayout
  register_slide(m);
  register_loader(m);
  register_augment(m);
}
