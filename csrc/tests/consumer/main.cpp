#include <distpp/distpp_kernels.h>
#include <stdio.h>
#include <string.h>

int main() {
  // A NULL params struct must come back as an error code, not a crash.
  const int s = distpp_plain_update(nullptr, nullptr);
  // A struct with the installed header's DISTPP_PARAMS_HEADER passes the ABI check (then x is NULL).
  const distpp_plain_update_params p = {DISTPP_PARAMS_HEADER(distpp_plain_update_params)};
  const int h = distpp_plain_update(&p, nullptr);
  printf("abi %d, status %s, header check: %s\n", distpp_abi_version(), distpp_error_string(s),
         distpp_last_error_message());
  return (distpp_abi_version() == DISTPP_ABI_VERSION && s == DISTPP_ERROR_NULL_POINTER &&
          h == DISTPP_ERROR_NULL_POINTER && strstr(distpp_last_error_message(), "x is NULL") != nullptr)
             ? 0
             : 1;
}
