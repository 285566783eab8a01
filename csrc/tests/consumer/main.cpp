#include <distpp/distpp_kernels.h>
#include <stdio.h>

int main() {
  // A NULL params struct must come back as an error code, not a crash.
  const int s = distpp_plain_update(nullptr, nullptr);
  printf("abi %d, status %s\n", distpp_abi_version(), distpp_error_string(s));
  return (distpp_abi_version() == DISTPP_ABI_VERSION && s == DISTPP_ERROR_NULL_POINTER) ? 0 : 1;
}
