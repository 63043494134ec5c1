// The extension module: mlxtune's CPU primitives (attention.cpp, cross_entropy.cpp).
#include <nanobind/nanobind.h>

namespace nb = nanobind;

namespace mlxtune_native {
void register_attention(nb::module_& m);
void register_cross_entropy(nb::module_& m);
}  // namespace mlxtune_native

NB_MODULE(_cpu_kernels, m) {
  m.doc() = "mlxtune's primitives for MLX's CPU backend";
  mlxtune_native::register_attention(m);
  mlxtune_native::register_cross_entropy(m);
}
