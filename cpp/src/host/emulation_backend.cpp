#include "host/emulation_backend.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <thread>
#include <tuple>
#include <unistd.h>
#include <vector>

#include "aqua/error.hpp"
#include "aqua/types.hpp"
#include "host/worker_stream.hpp"

namespace aqua::host {

namespace {
constexpr std::size_t page = 4096;

struct memory_book {  // process-wide: a pretended device size outlives backend instances
  struct budget {
    std::size_t limit = 0;  ///< 0: the host's memory
    std::size_t used = 0;
  };
  std::mutex mutex;
  std::unordered_map<int, budget> budgets;                        // LOCK: mutex
  std::unordered_map<void*, std::pair<int, std::size_t>> arenas;  // LOCK: mutex
};
memory_book& book() {
  static auto* b = new memory_book();  // leaked: used by destructors at exit
  return *b;
}
worker_stream& as_stream(stream_t s) { return *reinterpret_cast<worker_stream*>(s); }
}  // namespace

emulation_backend::emulation_backend(int devices) : devices_(devices) {
  AQUA_EXPECTS(devices >= 1 && devices <= 64, invalid_argument_error,
               "emulation backend: device count must be in [1, 64], got " + std::to_string(devices));
}

std::string emulation_backend::device_name(int device) const {
  check_device(device, "device_name");
  return device == 0 ? "emulated compute device (host memory)" : "emulated peer (host memory arena)";
}

std::string emulation_backend::device_label(int device) const {
  return "emu:" + std::to_string(device);
}

bool emulation_backend::can_access_peer(int device, int peer) const {
  check_device(device, "can_access_peer");
  check_device(peer, "can_access_peer");
  return true;
}

void emulation_backend::enable_peer_access(int device, int peer) {
  check_device(device, "enable_peer_access");
  check_device(peer, "enable_peer_access");
}

void emulation_backend::check_device(int device, const char* what) const {
  AQUA_EXPECTS(device >= 0 && device < devices_, invalid_argument_error,
               std::string(what) + ": emulated device " + std::to_string(device) +
                   " does not exist (" + std::to_string(devices_) + " emulated devices)");
}

void* emulation_backend::allocate_arena(std::size_t bytes) {
  // Rounding a size within a page of SIZE_MAX up to pages wraps to 0, which aligned_alloc
  // would grant: then the pre-fault loop below writes everywhere.
  void* p = bytes > SIZE_MAX - page ? nullptr : std::aligned_alloc(page, align_up(bytes, page));
  if (!p)
    throw out_of_memory_error(with_location("emulation backend: host allocation of " +
                                                format_bytes(bytes) + " failed",
                                            __FILE__, __LINE__),
                              bytes);
  // Pre-fault every page now, so no page fault lands on the hot path (as pinned memory).
  auto* b = static_cast<unsigned char*>(p);
  for (std::size_t i = 0; i < bytes; i += page) b[i] = 0;
  return p;
}

std::pair<std::size_t, std::size_t> emulation_backend::memory_info(int device) {
  check_device(device, "memory_info");
  {
    std::lock_guard<std::mutex> lock(book().mutex);
    auto it = book().budgets.find(device);
    if (it != book().budgets.end() && it->second.limit > 0)
      return {it->second.limit - std::min(it->second.used, it->second.limit), it->second.limit};
  }
  const auto page_bytes = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  return {static_cast<std::size_t>(sysconf(_SC_AVPHYS_PAGES)) * page_bytes,
          static_cast<std::size_t>(sysconf(_SC_PHYS_PAGES)) * page_bytes};
}

void emulation_backend::set_device_memory(int device, std::size_t bytes) {
  check_device(device, "set_device_memory");
  std::lock_guard<std::mutex> lock(book().mutex);
  // A fresh device of that size: arenas made before (other managers') are not counted.
  book().budgets[device] = {bytes, 0};
  for (auto it = book().arenas.begin(); it != book().arenas.end();)
    it = it->second.first == device ? book().arenas.erase(it) : std::next(it);
}

void* emulation_backend::allocate_device(int device, std::size_t bytes) {
  check_device(device, "allocate_device");
  {
    std::lock_guard<std::mutex> lock(book().mutex);
    auto& b = book().budgets[device];
    if (b.limit > 0 && b.used + bytes > b.limit)
      throw out_of_memory_error(with_location("emulation: allocation of " + format_bytes(bytes) +
                                                  " on emu:" + std::to_string(device) +
                                                  " failed: out of memory (as cudaErrorMemoryAllocation)",
                                              __FILE__, __LINE__),
                                bytes);
    b.used += bytes;
  }
  void* p = nullptr;
  try {
    p = allocate_arena(bytes);
  } catch (...) {
    std::lock_guard<std::mutex> lock(book().mutex);
    book().budgets[device].used -= bytes;
    throw;
  }
  std::lock_guard<std::mutex> lock(book().mutex);
  book().arenas[p] = {device, bytes};
  return p;
}

void emulation_backend::free_device(int, void* ptr) noexcept {
  if (!ptr) return;
  {
    std::lock_guard<std::mutex> lock(book().mutex);
    auto it = book().arenas.find(ptr);
    if (it != book().arenas.end()) {
      book().budgets[it->second.first].used -= it->second.second;
      book().arenas.erase(it);
    }
  }
  std::free(ptr);
}

void* emulation_backend::allocate_pinned_host(std::size_t bytes) { return allocate_arena(bytes); }

void emulation_backend::free_pinned_host(void* ptr, std::size_t) noexcept { std::free(ptr); }

stream_t emulation_backend::create_stream(int device, bool) {
  // Every emulated stream has its own worker thread: a demand fetch never queues behind
  // another lane's work anyway, so priority has nothing to change here.
  check_device(device, "create_stream");
  return reinterpret_cast<stream_t>(new worker_stream());
}

void emulation_backend::destroy_stream(stream_t stream) noexcept {
  if (stream) delete &as_stream(stream);
}

void emulation_backend::synchronize_stream(stream_t stream) {
  if (stream) as_stream(stream).synchronize();
}

emulation_backend::flag_event& emulation_backend::as_event(event_t e) {
  return *reinterpret_cast<flag_event*>(e);
}

event_t emulation_backend::create_event(int device) {
  check_device(device, "create_event");
  return reinterpret_cast<event_t>(new flag_event());
}

void emulation_backend::destroy_event(event_t event) noexcept {
  if (event) delete &as_event(event);
}

void emulation_backend::record(event_t event, stream_t stream) {
  flag_event& ev = as_event(event);
  std::uint64_t generation = 0;
  {
    std::lock_guard<std::mutex> lock(ev.mutex);
    generation = ++ev.recorded;
    if (stream != 0) ev.pending.push_back(generation);  // the host "stream" is already there
  }
  if (stream == 0) {
    ev.cv.notify_all();
    return;
  }
  as_stream(stream).enqueue([&ev, generation] {
    {
      std::lock_guard<std::mutex> lock(ev.mutex);
      ev.pending.erase(std::find(ev.pending.begin(), ev.pending.end(), generation));
    }
    ev.cv.notify_all();
  });
}

bool emulation_backend::query(event_t event) {
  flag_event& ev = as_event(event);
  std::lock_guard<std::mutex> lock(ev.mutex);
  return ev.done(ev.recorded);
}

void emulation_backend::wait_for(flag_event& ev, std::uint64_t generation) {
  // Spin briefly first (see worker_stream.hpp): most waits end within microseconds.
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
  std::unique_lock<std::mutex> lock(ev.mutex);
  while (!ev.done(generation) && std::chrono::steady_clock::now() < until) {
    lock.unlock();
    std::this_thread::yield();
    lock.lock();
  }
  ev.cv.wait(lock, [&] { return ev.done(generation); });
}

void emulation_backend::wait(event_t event) {
  flag_event& ev = as_event(event);
  std::uint64_t generation = 0;
  {
    std::lock_guard<std::mutex> lock(ev.mutex);
    generation = ev.recorded;
  }
  wait_for(ev, generation);
}

void emulation_backend::stream_wait(stream_t stream, event_t event) {
  flag_event& ev = as_event(event);
  std::uint64_t generation = 0;
  {
    std::lock_guard<std::mutex> lock(ev.mutex);
    generation = ev.recorded;  // captured now: later records do not move this wait
  }
  if (stream == 0) {
    wait_for(ev, generation);
    return;
  }
  as_stream(stream).enqueue([&ev, generation] { wait_for(ev, generation); });
}

void emulation_backend::inject_copy_faults(int count) {
  AQUA_EXPECTS(count >= 0, invalid_argument_error, "inject_copy_faults: count must be >= 0");
  faults_.store(count);
}

void emulation_backend::take_fault() {
  int left = faults_.load();
  while (left > 0)
    if (faults_.compare_exchange_weak(left, left - 1))
      throw backend_error(with_location("emulation: injected copy fault", __FILE__, __LINE__),
                          "emulationInjectedFault");
}

batch_submit emulation_backend::copy_batch_async(void* const* dsts, const void* const* srcs,
                                                 const std::size_t* sizes, std::size_t count,
                                                 stream_t stream, bool) {
  take_fault();
  if (stream == 0) {
    for (std::size_t i = 0; i < count; ++i) std::memcpy(dsts[i], srcs[i], sizes[i]);
    // refused there as on CUDA's legacy default stream (refuse_host_stream_batches, tests)
    return refuse_host_batches_.load() ? batch_submit::per_copy : batch_submit::batched;
  }
  // One task for the whole batch, as one DMA descriptor list would be.
  std::vector<std::tuple<void*, const void*, std::size_t>> ops;
  ops.reserve(count);
  for (std::size_t i = 0; i < count; ++i) ops.emplace_back(dsts[i], srcs[i], sizes[i]);
  as_stream(stream).enqueue([ops = std::move(ops)] {
    for (const auto& [d, s, n] : ops) std::memcpy(d, s, n);
  });
  return batch_submit::batched;
}

void emulation_backend::copy_async(void* dst, const void* src, std::size_t bytes, stream_t stream) {
  take_fault();
  if (bytes == 0) return;
  if (stream == 0) {
    std::memcpy(dst, src, bytes);
    return;
  }
  as_stream(stream).enqueue([dst, src, bytes] { std::memcpy(dst, src, bytes); });
}

}  // namespace aqua::host
