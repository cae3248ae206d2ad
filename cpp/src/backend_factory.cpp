// The one place that knows which backends were compiled in (no #ifdef anywhere else).
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "aqua/backend.hpp"
#include "aqua/error.hpp"
#include "cuda/copy_kernel_body.hpp"
#include "host/emulation_backend.hpp"
#ifdef AQUA_HAVE_CUDA
#include "cuda/cuda_backend.hpp"
#endif

namespace aqua {

void backend::inject_copy_faults(int) {
  AQUA_FAIL(invalid_argument_error, "fault injection is supported by the emulation backend only");
}

void backend::refuse_host_stream_batches(bool) {
  AQUA_FAIL(invalid_argument_error,
            "refuse_host_stream_batches is supported by the emulation backend only");
}

void backend::set_device_memory(int, std::size_t) {
  AQUA_FAIL(invalid_argument_error, "set_device_memory is supported by the emulation backend only");
}

bool cuda_compiled() noexcept {
#ifdef AQUA_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

bool copy_kernel(std::optional<bool> set) {
#ifdef AQUA_HAVE_CUDA
  return cuda::copy_kernel_setting(set);
#else
  (void)set;
  return false;
#endif
}

bool copy_kernel_on_host(void* const* dsts, const void* const* srcs, const std::size_t* sizes,
                         std::size_t count) {
  namespace ck = kernel_copy;
  struct v16 {  // the host's 16-byte unit (uint4 on the device): assignment copies the bytes
    unsigned char b[16];
  };
  for (std::size_t i = 0; i < count; ++i)
    if (!ck::fits(dsts[i], srcs[i], sizes[i])) return false;
  for (std::size_t first = 0; first < count; first += ck::max_pieces) {  // one launch each
    const std::size_t n = std::min(ck::max_pieces, count - first);
    const std::size_t most = *std::max_element(sizes + first, sizes + first + n);
    const std::size_t stride = std::size_t{ck::blocks_per_piece(most)} * ck::threads;
    for (std::size_t i = first; i < first + n; ++i)
      for (std::size_t t = 0; t < stride; ++t)
        ck::copy_part<v16>(static_cast<unsigned char*>(dsts[i]),
                           static_cast<const unsigned char*>(srcs[i]), sizes[i], t, stride);
  }
  return true;
}

namespace {
int emulated_devices() {
  // Device 0 plays the compute device; the rest play peers. AQUA_EMULATED_DEVICES overrides.
  if (const char* env = std::getenv("AQUA_EMULATED_DEVICES")) {
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && n >= 1 && n <= 64) return static_cast<int>(n);
    throw invalid_argument_error(std::string("AQUA_EMULATED_DEVICES must be an integer in [1, 64], got '") +
                                 env + "'");
  }
  return 2;
}
}  // namespace

std::shared_ptr<backend> make_backend(const std::string& name) {
  // Weak cache: one instance per backend while any store uses it, so the CUDA runtime objects
  // are gone before the runtime itself is torn down at exit.
  static std::mutex mutex;
  static std::weak_ptr<backend> emulation, cuda;
  std::lock_guard<std::mutex> lock(mutex);
  if (name == "emulation") {
    auto b = emulation.lock();
    if (!b) emulation = b = std::make_shared<host::emulation_backend>(emulated_devices());
    return b;
  }
  if (name == "cuda") {
#ifdef AQUA_HAVE_CUDA
    auto b = cuda.lock();
    if (!b) cuda = b = std::make_shared<cuda::cuda_backend>();
    return b;
#else
    throw backend_error("the CUDA backend was not compiled into this build of aqua_offload "
                        "(no CUDA toolkit at build time, or AQUA_CUDA=OFF)",
                        "cudaBackendNotCompiled");
#endif
  }
  throw invalid_argument_error("unknown backend '" + name + "' (expected 'cuda' or 'emulation')");
}

}  // namespace aqua
