// The CPU kernel on the shared l2_normalize cases.
#include "elva/l2_normalize.h"
#include "l2_normalize_cases.h"

int main() {
  elva::test::run_l2_normalize_cases([](const void* x, size_t, elva::DType dtype, int64_t rows, int64_t dim,
                                        int64_t row_stride, double eps, float* out) {
    return elva::l2_normalize_cpu(x, dtype, rows, dim, row_stride, eps, out);
  });
  return elva::test::finish("l2_normalize cpu");
}
