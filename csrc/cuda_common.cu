// Shared pieces of the CUDA library: launch error reporting and the backend flag.
#include <cuda_runtime.h>

#include "abi_checks.h"
#include "vec_io.cuh"

namespace distpp {

int launch_status() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return fail(DISTPP_ERROR_CUDA, "kernel launch failed: %s (%s)", cudaGetErrorString(err), cudaGetErrorName(err));
  return DISTPP_SUCCESS;
}

}  // namespace distpp

extern "C" DISTPP_API int distpp_is_cuda(void) { return 1; }
