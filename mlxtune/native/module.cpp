// The extension module: mlxtune's CPU primitives (attention.cpp, cross_entropy.cpp), and
// the BLAS hold their parallel loops share (common.h), exposed for the tests.
#include <nanobind/nanobind.h>

#include <optional>

#include "common.h"

namespace nb = nanobind;

namespace mlxtune_native {
void register_attention(nb::module_& m);
void register_cross_entropy(nb::module_& m);
}  // namespace mlxtune_native

namespace {

// `with _BlasHold():` holds the BLAS single-threaded as a primitive's parallel loop does.
struct PyBlasHold {
  std::optional<mlxtune_native::BlasHold> hold;
};

}  // namespace

NB_MODULE(_cpu_kernels, m) {
  m.doc() = "mlxtune's primitives for MLX's CPU backend";
  mlxtune_native::register_attention(m);
  mlxtune_native::register_cross_entropy(m);
  nb::class_<PyBlasHold>(m, "_BlasHold")
      .def(nb::init<>())
      .def("__enter__", [](PyBlasHold& self) { self.hold.emplace(); })
      .def("__exit__", [](PyBlasHold& self, nb::args) { self.hold.reset(); });
  m.def("_blas_count", &mlxtune_native::BlasHold::blas_count,
        "The BLAS thread count the parallel loops size themselves by.");
}
