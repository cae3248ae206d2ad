#include "cuda/cuda_backend.hpp"

#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "aqua/error.hpp"
#ifdef AQUA_HAVE_CUDA_KERNELS
#include "cuda/copy_kernel.hpp"
#endif

#define AQUA_CUDA_TRY(call)                                                                    \
  do {                                                                                          \
    const cudaError_t aqua_err_ = (call);                                                       \
    if (aqua_err_ != cudaSuccess) ::aqua::cuda::throw_cuda_error(aqua_err_, #call, __FILE__, __LINE__); \
  } while (0)

namespace aqua::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line) {
  cudaGetLastError();  // clear a sticky-free error so the next call starts clean
  const std::string name = cudaGetErrorName(err);
  const std::string what = std::string(call) + " failed: " + name + ": " + cudaGetErrorString(err);
  if (err == cudaErrorMemoryAllocation)
    throw out_of_memory_error(with_location(what, file, line), 0);
  throw backend_error(with_location(what, file, line), name);
}

namespace {
// Destructors and free_* must not throw, and at interpreter exit the runtime may already be
// unloading (cudaErrorCudartUnloading): ignore errors there.
void ignore(cudaError_t) noexcept { cudaGetLastError(); }

#ifdef AQUA_HAVE_CUDA_KERNELS
// Note [Copy kernel] (copy_kernel.hpp): opt-in. AQUA_COPY_KERNEL is read once (getenv races
// with a setenv elsewhere in the process); tests and profiles switch it with copy_kernel().
std::atomic<int> copy_kernel_on{-1};  // -1: not read yet

bool copy_kernel_wanted() { return copy_kernel_setting(std::nullopt); }
#endif

stream_t to_handle(cudaStream_t s) { return reinterpret_cast<stream_t>(s); }
cudaStream_t to_stream(stream_t s) { return reinterpret_cast<cudaStream_t>(s); }
cudaEvent_t to_event(event_t e) { return reinterpret_cast<cudaEvent_t>(e); }
}  // namespace

bool copy_kernel_setting(std::optional<bool> set) {
#ifndef AQUA_HAVE_CUDA_KERNELS
  (void)set;
  return false;  // built without a CUDA compiler: no kernel to switch on
#else
  if (set) {
    copy_kernel_on.store(*set ? 1 : 0, std::memory_order_relaxed);
    return *set;
  }
  int v = copy_kernel_on.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* env = std::getenv("AQUA_COPY_KERNEL");
    int read = env != nullptr && env[0] == '1' && env[1] == '\0' ? 1 : 0;
    copy_kernel_on.compare_exchange_strong(v, read, std::memory_order_relaxed);
    v = copy_kernel_on.load(std::memory_order_relaxed);
  }
  return v == 1;
#endif
}

cuda_backend::cuda_backend() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  // No driver or no device is not an error here: the backend simply has no devices.
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    cudaGetLastError();
    n = 0;
    status_ = err == cudaErrorNoDevice
                  ? "no CUDA device (cudaErrorNoDevice)"
                  : "no CUDA driver, or one older than this build's CUDA " +
                        std::to_string(CUDART_VERSION / 1000) + "." +
                        std::to_string(CUDART_VERSION % 1000 / 10) +
                        " runtime needs (cudaErrorInsufficientDriver)";
  } else if (err != cudaSuccess) {
    throw_cuda_error(err, "cudaGetDeviceCount", __FILE__, __LINE__);
  }
  devices_ = n;
  if (n > 0) {
    void* get = nullptr;
    void* set = nullptr;
    cudaDriverEntryPointQueryResult found_get{}, found_set{};
    if (cudaGetDriverEntryPointByVersion("cuCtxGetCurrent", &get, 12000, cudaEnableDefault,
                                         &found_get) == cudaSuccess &&
        cudaGetDriverEntryPointByVersion("cuCtxSetCurrent", &set, 12000, cudaEnableDefault,
                                         &found_set) == cudaSuccess &&
        found_get == cudaDriverEntryPointSuccess && found_set == cudaDriverEntryPointSuccess) {
      ctx_get_ = reinterpret_cast<ctx_get_fn>(get);
      ctx_set_ = reinterpret_cast<ctx_set_fn>(set);
    }
    cudaGetLastError();
  }
}

void cuda_backend::check_device(int device, const char* what) const {
  AQUA_EXPECTS(device >= 0 && device < devices_, invalid_argument_error,
               std::string(what) + ": cuda:" + std::to_string(device) + " does not exist (" +
                   std::to_string(devices_) + " CUDA device(s))");
}

std::string cuda_backend::device_name(int device) const {
  check_device(device, "device_name");
  cudaDeviceProp prop{};
  AQUA_CUDA_TRY(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

std::string cuda_backend::device_label(int device) const { return "cuda:" + std::to_string(device); }

bool cuda_backend::can_access_peer(int device, int peer) const {
  check_device(device, "can_access_peer");
  check_device(peer, "can_access_peer");
  if (device == peer) return true;
  int ok = 0;
  AQUA_CUDA_TRY(cudaDeviceCanAccessPeer(&ok, device, peer));
  return ok != 0;
}

void cuda_backend::enable_peer_access(int device, int peer) {
  if (device == peer) return;
  device_guard guard(*this, device);
  const cudaError_t err = cudaDeviceEnablePeerAccess(peer, 0);
  if (err == cudaErrorPeerAccessAlreadyEnabled) {
    cudaGetLastError();
    return;
  }
  AQUA_CUDA_TRY(err);
}

std::pair<std::size_t, std::size_t> cuda_backend::memory_info(int device) {
  check_device(device, "memory_info");
  device_guard guard(*this, device);
  std::size_t free = 0, total = 0;
  AQUA_CUDA_TRY(cudaMemGetInfo(&free, &total));
  return {free, total};
}

// Note [No stray contexts] (backend.hpp). The token is the previous CUcontext, 0 meaning
// "restore nothing".
std::uintptr_t cuda_backend::enter_device(int device) {
  if (ctx_get_ && ctx_set_) {
    void* previous = nullptr;
    if (ctx_get_(&previous) != 0) previous = nullptr;
    AQUA_CUDA_TRY(cudaSetDevice(device));
    // A thread with no context gets its device set and keeps it: nothing to restore, and
    // restoring "no context" would only make the next call bind one again.
    return reinterpret_cast<std::uintptr_t>(previous);
  }
  // Without the entry points nothing tells whether restoring would create a context (a fresh
  // thread reports device 0 as current): set the device and restore nothing.
  AQUA_CUDA_TRY(cudaSetDevice(device));
  return 0;
}

void cuda_backend::restore_device(std::uintptr_t previous) noexcept {
  if (previous == 0 || !ctx_get_ || !ctx_set_) return;
  void* now = nullptr;
  if (ctx_get_(&now) == 0 && now != reinterpret_cast<void*>(previous))
    ctx_set_(reinterpret_cast<void*>(previous));
}

void* cuda_backend::allocate_device(int device, std::size_t bytes) {
  check_device(device, "allocate_device");
  device_guard guard(*this, device);
  void* p = nullptr;
  AQUA_CUDA_TRY(cudaMalloc(&p, bytes));
  return p;
}

void cuda_backend::free_device(int device, void* ptr) noexcept {
  if (!ptr) return;
  try {
    device_guard guard(*this, device);
    ignore(cudaFree(ptr));
  } catch (...) {  // the runtime is unloading (exit): the driver frees it with the context
  }
}

void* cuda_backend::allocate_pinned_host(std::size_t bytes) {
  // Portable: usable by copy streams of every device. Page-locked memory is resident on
  // return, so there is nothing left to pre-fault.
  void* p = nullptr;
  AQUA_CUDA_TRY(cudaHostAlloc(&p, bytes, cudaHostAllocPortable));
  return p;
}

void cuda_backend::free_pinned_host(void* ptr, std::size_t) noexcept {
  if (ptr) ignore(cudaFreeHost(ptr));
}

stream_t cuda_backend::create_stream(int device, bool high_priority) {
  check_device(device, "create_stream");
  device_guard guard(*this, device);
  int least = 0, greatest = 0;  // numerically lower is higher priority
  AQUA_CUDA_TRY(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  cudaStream_t s = nullptr;
  AQUA_CUDA_TRY(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking,
                                             high_priority ? greatest : least));
  return to_handle(s);
}

void cuda_backend::destroy_stream(stream_t stream) noexcept {
  if (stream) ignore(cudaStreamDestroy(to_stream(stream)));
}

void cuda_backend::synchronize_stream(stream_t stream) {
  AQUA_CUDA_TRY(cudaStreamSynchronize(to_stream(stream)));
}

event_t cuda_backend::create_event(int device) {
  check_device(device, "create_event");
  device_guard guard(*this, device);
  cudaEvent_t e = nullptr;
  AQUA_CUDA_TRY(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return reinterpret_cast<event_t>(e);
}

void cuda_backend::destroy_event(event_t event) noexcept {
  if (event) ignore(cudaEventDestroy(to_event(event)));
}

void cuda_backend::record(event_t event, stream_t stream) {
  AQUA_CUDA_TRY(cudaEventRecord(to_event(event), to_stream(stream)));
}

bool cuda_backend::query(event_t event) {
  const cudaError_t err = cudaEventQuery(to_event(event));
  if (err == cudaSuccess) return true;
  if (err == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  throw_cuda_error(err, "cudaEventQuery", __FILE__, __LINE__);
}

void cuda_backend::wait(event_t event) { AQUA_CUDA_TRY(cudaEventSynchronize(to_event(event))); }

void cuda_backend::stream_wait(stream_t stream, event_t event) {
  AQUA_CUDA_TRY(cudaStreamWaitEvent(to_stream(stream), to_event(event), 0));
}

void cuda_backend::copy_async(void* dst, const void* src, std::size_t bytes, stream_t stream) {
  if (bytes == 0) return;
  // cudaMemcpyDefault: unified addressing infers the kind (D2H, H2D, D2D, peer over NVLink).
  AQUA_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, to_stream(stream)));
}

bool cuda_backend::batches_on(stream_t stream) const noexcept {
#if CUDART_VERSION >= 12080
  // cudaMemcpyBatchAsync refuses the legacy default stream outright (torch's default stream;
  // the per-thread default stream is a real stream to the driver and is accepted).
  return stream != 0 && to_stream(stream) != cudaStreamLegacy;
#else
  (void)stream;
  return true;  // no batch API: one copy each on any stream, nothing to relay for
#endif
}

batch_submit cuda_backend::copy_batch_async(void* const* dsts, const void* const* srcs,
                                            const std::size_t* sizes, std::size_t count,
                                            stream_t stream, bool own) {
  if (count == 0) return batch_submit::batched;
#ifdef AQUA_HAVE_CUDA_KERNELS
  if (own && copy_kernel_wanted() && copy_kernel_fits(dsts, srcs, sizes, count)) {
    std::size_t launched = 0;  // Note [Copy kernel]
    const cudaError_t err = launch_copy_pieces(dsts, srcs, sizes, count, to_stream(stream),
                                               &launched);
    if (err == cudaSuccess) return batch_submit::kernel;
    if (err != cudaErrorNoKernelImageForDevice && err != cudaErrorInvalidDeviceFunction)
      throw_cuda_error(err, "launch_copy_pieces", __FILE__, __LINE__);
    cudaGetLastError();  // no image of it for this GPU: DMA from now on, this batch's rest too
    copy_kernel_setting(false);
    dsts += launched;
    srcs += launched;
    sizes += launched;
    count -= launched;
  }
#else
  (void)own;
#endif
#if CUDART_VERSION >= 12080
  // One submission for many small copies: the driver coalesces them instead of paying a launch
  // per copy. Stream-ordered source access: sources may be written by earlier stream work.
  cudaMemcpyAttributes attrs{};
  attrs.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  std::size_t attrs_index = 0;
#if CUDART_VERSION >= 13000
  const cudaError_t err = cudaMemcpyBatchAsync(dsts, srcs, sizes, count, &attrs, &attrs_index, 1,
                                               to_stream(stream));
#else
  std::size_t fail_index = 0;
  const cudaError_t err =
      cudaMemcpyBatchAsync(const_cast<void**>(dsts), const_cast<void**>(srcs),
                           const_cast<std::size_t*>(sizes), count, &attrs, &attrs_index, 1,
                           &fail_index, to_stream(stream));
#endif
  if (err == cudaSuccess) return batch_submit::batched;
  // Refusals: the API unsupported here, arguments it does not take, or a driver older than the
  // runtime that has the entry point (the static runtime on a pre-12.8 driver).
  if (err != cudaErrorNotSupported && err != cudaErrorInvalidValue &&
      err != cudaErrorCallRequiresNewerDriver)
    throw_cuda_error(err, "cudaMemcpyBatchAsync", __FILE__, __LINE__);
  cudaGetLastError();  // refused here (counted by the copy engine): one copy each
#endif
  for (std::size_t i = 0; i < count; ++i) copy_async(dsts[i], srcs[i], sizes[i], stream);
  return batch_submit::per_copy;
}

}  // namespace aqua::cuda
