// The only pybind11 file: exposes the core to aqua_offload (Python) as aqua_offload._core.
//  - C++ exceptions become the Python classes of aqua_offload/errors.py, which that module hands
//    down through _register_errors() at import (so this file never imports upward).
//  - Every call that can block (copies, waits, locks, allocation) releases the GIL.
//  - Pointers and streams cross as integers (tensor.data_ptr(), stream.cuda_stream).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "aqua/backend.hpp"
#include "aqua/error.hpp"
#include "aqua/pool.hpp"
#include "aqua/store.hpp"

namespace py = pybind11;
using aqua::store;

namespace {

struct error_classes {
  py::object base, oom, invalid_handle, invalid_argument, backend;
};
error_classes& errors() {
  // Leaked on purpose: Python objects must not be destroyed after the interpreter is gone.
  static auto* e = new error_classes();
  return *e;
}

void raise(const py::object& cls, py::object instance, PyObject* fallback, const char* what) {
  if (cls) {
    PyErr_SetObject(cls.ptr(), instance.ptr());
  } else {
    PyErr_SetString(fallback, what);
  }
}

void translate(std::exception_ptr p) {
  auto& e = errors();
  try {
    if (p) std::rethrow_exception(p);
  } catch (const aqua::out_of_memory_error& x) {
    raise(e.oom, e.oom ? e.oom(x.what(), py::arg("requested") = x.requested()) : py::object(),
          PyExc_MemoryError, x.what());
  } catch (const aqua::invalid_handle_error& x) {
    raise(e.invalid_handle, e.invalid_handle ? e.invalid_handle(x.what()) : py::object(),
          PyExc_KeyError, x.what());
  } catch (const aqua::invalid_argument_error& x) {
    raise(e.invalid_argument, e.invalid_argument ? e.invalid_argument(x.what()) : py::object(),
          PyExc_ValueError, x.what());
  } catch (const aqua::backend_error& x) {
    raise(e.backend,
          e.backend ? e.backend(x.what(), py::arg("error_name") = x.error_name()) : py::object(),
          PyExc_RuntimeError, x.what());
  } catch (const aqua::error& x) {
    raise(e.base, e.base ? e.base(x.what()) : py::object(), PyExc_RuntimeError, x.what());
  }
}

py::dict pool_stats_dict(const aqua::pool_stats& s) {
  py::dict d;
  d["capacity"] = s.capacity;
  d["used"] = s.used;
  d["peak"] = s.peak;
  d["free"] = s.free;
  d["largest_free"] = s.largest_free;
  d["blocks"] = s.blocks;
  d["free_ranges"] = s.free_ranges;
  d["fragmentation"] = s.fragmentation;
  d["segments"] = s.segments;
  d["fenced"] = s.fenced;
  return d;
}

py::dict store_stats_dict(const aqua::store_stats& s) {
  py::list tiers;
  for (const auto& t : s.tiers) {
    py::dict d = pool_stats_dict(t.pool);
    d["tier"] = t.kind;
    d["location"] = t.location;
    d["handles"] = t.handles;
    d["lent_segments"] = t.lent_segments;
    tiers.append(d);
  }
  py::dict d;
  d["tiers"] = tiers;
  d["offloads"] = s.offloads;
  d["fetches"] = s.fetches;
  d["frees"] = s.frees;
  d["prefetches"] = s.prefetches;
  d["bytes_offloaded"] = s.bytes_offloaded;
  d["bytes_fetched"] = s.bytes_fetched;
  d["bytes_migrated"] = s.bytes_migrated;
  d["incremental_offloads"] = s.incremental_offloads;
  d["incremental_bytes_saved"] = s.incremental_bytes_saved;
  d["evictions"] = s.evictions;
  d["migrations"] = s.migrations;
  d["migration_failures"] = s.migration_failures;
  d["lends"] = s.lends;
  d["reclaims"] = s.reclaims;
  d["bytes_lent"] = s.bytes_lent;
  d["bytes_reclaimed"] = s.bytes_reclaimed;
  d["reclaim_last_s"] = s.reclaim_last_s;
  d["reclaim_max_s"] = s.reclaim_max_s;
  d["reclaim_total_s"] = s.reclaim_total_s;
  d["reclaim_last_bytes_moved"] = s.reclaim_last_bytes_moved;
  d["batched_submissions"] = s.batched_submissions;
  d["batch_fallbacks"] = s.batch_fallbacks;
  d["batch_kernels"] = s.batch_kernels;
  d["live_handles"] = s.live_handles;
  d["events_created"] = s.events_created;
  return d;
}

py::dict backend_info(const std::string& name) {
  std::shared_ptr<aqua::backend> b;
  {
    py::gil_scoped_release release;
    b = aqua::make_backend(name);
  }
  py::dict d;
  d["name"] = b->name();
  d["emulation"] = b->is_emulation();
  const int n = b->device_count();
  d["device_count"] = n;
  d["status"] = b->status();
  py::list devices;
  py::list access;
  for (int i = 0; i < n; ++i) {
    py::dict dev;
    dev["index"] = i;
    dev["label"] = b->device_label(i);
    dev["name"] = b->device_name(i);
    devices.append(dev);
    py::list row;
    for (int j = 0; j < n; ++j) row.append(b->can_access_peer(i, j));
    access.append(row);
  }
  d["devices"] = devices;
  d["peer_access"] = access;
  return d;
}

aqua::lane parse_lane(const std::string& l) {
  if (l == "to_tier") return aqua::lane::to_tier;
  if (l == "prefetch") return aqua::lane::prefetch;
  if (l == "demand") return aqua::lane::demand;
  if (l == "migrate") return aqua::lane::migrate;
  AQUA_FAIL(invalid_argument_error,
            "lane must be 'to_tier', 'prefetch', 'demand' or 'migrate', got '" + l + "'");
}

void* as_ptr(std::uintptr_t p) { return reinterpret_cast<void*>(p); }

// Pieces of a batch of copies: one destination, source and size each.
using pieces = std::vector<std::uintptr_t>;

void check_pieces(const pieces& dsts, const pieces& srcs, const std::vector<std::size_t>& sizes,
                  const char* what) {
  AQUA_EXPECTS(dsts.size() == srcs.size() && srcs.size() == sizes.size(), invalid_argument_error,
               std::string(what) + ": one destination, source and size per piece");
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "aqua_offload C++ core (pools, handle store, copy engine, backends).";
  py::register_exception_translator(&translate);

  m.def(
      "_register_errors",
      [](py::object base, py::object oom, py::object handle, py::object argument,
         py::object backend) {
        auto& e = errors();
        e.base = std::move(base);
        e.oom = std::move(oom);
        e.invalid_handle = std::move(handle);
        e.invalid_argument = std::move(argument);
        e.backend = std::move(backend);
      },
      "Installs the Python exception classes core errors are raised as.");
  m.def("cuda_compiled", &aqua::cuda_compiled, "Whether the CUDA backend is in this build.");
  m.def(
      "copy_kernel", [](std::optional<bool> enabled) { return aqua::copy_kernel(enabled); },
      py::arg("enabled") = py::none(),
      "Whether batches of small copies take the CUDA copy kernel (opt-in: AQUA_COPY_KERNEL=1, "
      "read once; or set it here). Returns the setting in force; always False without CUDA.");
  m.def(
      "_copy_kernel_on_host",
      [](const pieces& dsts, const pieces& srcs, const std::vector<std::size_t>& sizes) {
        check_pieces(dsts, srcs, sizes, "_copy_kernel_on_host");
        std::vector<void*> d;
        std::vector<const void*> s;
        for (std::size_t i = 0; i < sizes.size(); ++i) {
          d.push_back(as_ptr(dsts[i]));
          s.push_back(as_ptr(srcs[i]));
        }
        py::gil_scoped_release release;
        return aqua::copy_kernel_on_host(d.data(), s.data(), sizes.data(), sizes.size());
      },
      py::arg("dsts"), py::arg("srcs"), py::arg("sizes"),
      "Testing: every thread of the CUDA copy kernel's launches for these host pieces, run on "
      "the host. False (nothing copied) when a piece does not fit the kernel.");
  m.def("backend_info", &backend_info, py::arg("name"),
        "Devices and peer-access matrix of a backend ('cuda' or 'emulation').");
  m.def("format_bytes", &aqua::format_bytes, py::arg("nbytes"));
  m.attr("block_alignment") = aqua::block_alignment;
  m.attr("default_chunk_bytes") = aqua::default_chunk_bytes;
  m.def(
      "memory_info",
      [](const std::string& backend, int device) {
        py::gil_scoped_release release;
        return aqua::make_backend(backend)->memory_info(device);
      },
      py::arg("backend"), py::arg("device"),
      "(free, total) bytes of a device's memory now (cudaMemGetInfo; the host's on emulation).");

  m.def(
      "memcpy_many",
      [](const pieces& dsts, const pieces& srcs, const std::vector<std::size_t>& sizes) {
        check_pieces(dsts, srcs, sizes, "memcpy_many");
        py::gil_scoped_release release;
        for (std::size_t i = 0; i < sizes.size(); ++i)
          std::memcpy(as_ptr(dsts[i]), as_ptr(srcs[i]), sizes[i]);
      },
      py::arg("dsts"), py::arg("srcs"), py::arg("sizes"),
      "Host memory copies, one per piece, in one call with the GIL released (the remote "
      "tier's staging on emulation: a batch of 1000 pieces pays one call, not 1000).");
  m.def("eviction_policies", &aqua::eviction_policy_names, "Names of the eviction policies.");
  m.def(
      "inject_copy_faults",
      [](int count) { aqua::make_backend("emulation")->inject_copy_faults(count); },
      py::arg("count"),
      "Emulation backend: make the next `count` copy submissions fail (tests of failure paths).");
  m.def(
      "refuse_host_stream_batches",
      [](bool refuse) { aqua::make_backend("emulation")->refuse_host_stream_batches(refuse); },
      py::arg("refuse"),
      "Emulation backend: batches on its host stream 0 are relayed as CUDA's legacy default "
      "stream's are (Note [Relay] in copy_engine.hpp; tests of that path).");
  m.def(
      "set_device_memory",
      [](int device, std::size_t bytes) {
        aqua::make_backend("emulation")->set_device_memory(device, bytes);
      },
      py::arg("device"), py::arg("nbytes"),
      "Emulation backend: pretend a device has `nbytes` of memory (0: the host's), for tests of "
      "peer budgets and allocation failures.");

  py::class_<aqua::pool>(m, "Pool", "Best-fit suballocator over offsets (fake memory), for tests.")
      .def(py::init<std::size_t>(), py::arg("capacity") = 0)
      .def("allocate", [](aqua::pool& p, std::size_t n) { return p.allocate(n); }, py::arg("nbytes"))
      .def(
          "allocate_fenced",
          [](aqua::pool& p, std::size_t n) {
            std::vector<std::uint64_t> fences;
            auto off = p.allocate(n, &fences);
            return std::make_pair(off, fences);
          },
          py::arg("nbytes"), "Like allocate, also returning the fence tokens the block inherits.")
      .def(
          "release",
          [](aqua::pool& p, std::size_t offset, std::uint64_t fence) {
            p.release(offset, fence ? std::vector<std::uint64_t>{fence} : std::vector<std::uint64_t>{});
          },
          py::arg("offset"), py::arg("fence") = 0)
      .def("clear_fence", &aqua::pool::clear_fence, py::arg("fence"))
      .def("block_size", &aqua::pool::block_size, py::arg("offset"))
      .def("add_segment", &aqua::pool::add_segment, py::arg("nbytes"))
      .def("drain_segment", &aqua::pool::drain_segment, py::arg("base"))
      .def("undrain_segment", &aqua::pool::undrain_segment, py::arg("base"))
      .def("remove_segment", &aqua::pool::remove_segment, py::arg("base"))
      .def("segments", &aqua::pool::segments)
      .def("blocks_in", &aqua::pool::blocks_in, py::arg("base"))
      .def("fenced", &aqua::pool::fenced, py::arg("base"))
      .def_property_readonly("capacity", &aqua::pool::capacity)
      .def_property_readonly("used", &aqua::pool::used)
      .def("stats", [](const aqua::pool& p) { return pool_stats_dict(p.stats()); });

  using release_gil = py::call_guard<py::gil_scoped_release>;
  py::class_<store, std::shared_ptr<store>>(m, "Store", "Handle table, pools and copy engine.")
      .def(py::init([](const std::string& backend, int device,
                       const std::vector<std::pair<int, std::size_t>>& peers,
                       std::size_t host_bytes, std::size_t chunk_bytes, const std::string& policy) {
             aqua::store_config cfg;
             cfg.device = device;
             for (const auto& [dev, bytes] : peers) cfg.peers.push_back({dev, bytes});
             cfg.host_bytes = host_bytes;
             cfg.chunk_bytes = chunk_bytes;
             cfg.policy = policy;
             return std::make_shared<store>(aqua::make_backend(backend), std::move(cfg));
           }),
           py::arg("backend"), py::arg("device"), py::arg("peers"), py::arg("host_bytes"),
           py::arg("chunk_bytes") = aqua::default_chunk_bytes, py::arg("policy") = "lru",
           release_gil())
      .def(
          "offload_many",
          [](store& s,
             const std::vector<std::tuple<std::uintptr_t, std::size_t, double, std::uint64_t>>& items,
             std::uintptr_t stream, bool fence, py::object out) {
            std::vector<aqua::offload_item> v;
            v.reserve(items.size());
            for (const auto& [src, n, prio, base] : items) v.push_back({as_ptr(src), n, prio, base});
            std::vector<aqua::offload_result> got;
            {
              py::gil_scoped_release release;
              got = s.offload_many(v, stream, fence);
            }
            py::list result;
            for (const auto& r : got) result.append(py::make_tuple(r.id, r.tier));
            // Filled before returning, in C++: an asynchronous exception (KeyboardInterrupt)
            // landing as this call returns cannot lose the handles the core made.
            if (!out.is_none()) out.attr("extend")(result);
            return result;
          },
          py::arg("items"), py::arg("stream"), py::arg("fence_user"), py::arg("out") = py::none(),
          "Items are (src, nbytes, priority, base handle or 0); returns (handle, tier) each, "
          "also appended to `out` (a list) when given.")
      .def(
          "fetch_many",
          [](store& s, const std::vector<std::uint64_t>& ids, const std::vector<std::uintptr_t>& dsts,
             std::uintptr_t stream, bool keep, py::object done) {
            std::vector<void*> d;
            d.reserve(dsts.size());
            for (auto p : dsts) d.push_back(as_ptr(p));
            {
              py::gil_scoped_release release;
              s.fetch_many(ids, d, stream, keep);
            }
            if (!done.is_none()) done.attr("append")(true);  // as for offload_many's `out`
          },
          py::arg("handles"), py::arg("dsts"), py::arg("stream"), py::arg("keep") = false,
          py::arg("done") = py::none())
      .def(
          "prefetch_many",
          [](store& s, const std::vector<std::uint64_t>& ids, const std::vector<std::uintptr_t>& dsts,
             std::uintptr_t stream) {
            std::vector<void*> d;
            d.reserve(dsts.size());
            for (auto p : dsts) d.push_back(as_ptr(p));
            return s.prefetch_many(ids, d, stream);
          },
          py::arg("handles"), py::arg("dsts"), py::arg("stream"), release_gil(),
          "Returns the tier each handle is prefetched from. An interrupted caller learns whether "
          "the prefetch happened from info() (Note [Interrupted batches] in manager.py).")
      .def("fence_source", &store::fence_source, py::arg("handle"), py::arg("stream"),
           release_gil())
      .def("lend", &store::lend, py::arg("device"), py::arg("nbytes"), release_gil())
      .def("reclaim", &store::reclaim, py::arg("device"), py::arg("nbytes") = py::none(),
           release_gil())
      .def("free", &store::free, py::arg("handle"), release_gil())
      .def("ready", &store::ready, py::arg("handle"), release_gil())
      .def("wait", &store::wait, py::arg("handle"), release_gil())
      .def("contains", &store::contains, py::arg("handle"), release_gil())
      .def("live_ids", &store::live_ids, release_gil())
      .def(
          "info",
          [](const store& s, std::uint64_t id) {
            aqua::handle_info i;
            {
              py::gil_scoped_release release;
              i = s.info(id);
            }
            return py::make_tuple(aqua::to_string(i.state), i.tier, i.nbytes, i.prefetched);
          },
          py::arg("handle"))
      .def("synchronize", &store::synchronize, release_gil())
      .def("close", &store::close, release_gil())
      .def_property_readonly("closed", &store::closed)
      .def("stats",
           [](store& s) {
             aqua::store_stats st;
             {
               py::gil_scoped_release release;
               st = s.stats();
             }
             return store_stats_dict(st);
           })
      .def_property_readonly("tier_count", &store::tier_count)
      .def("tier_kind", &store::tier_kind, py::arg("tier"))
      .def("tier_location", &store::tier_location, py::arg("tier"))
      .def(
          "copy_stream",
          [](store& s, std::size_t tier, const std::string& l) {
            return static_cast<std::uintptr_t>(s.copy_stream(tier, parse_lane(l)));
          },
          py::arg("tier"), py::arg("lane"))
      .def(
          "raw_copy",
          [](store& s, std::uintptr_t dst, std::uintptr_t src, std::size_t n, std::uintptr_t stream) {
            s.raw_copy_many({{as_ptr(dst), as_ptr(src), n}}, stream, false);
          },
          py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("stream"), release_gil(),
          "One unchunked copy on `stream`: the raw baseline benchmarks compare against.")
      .def(
          "raw_copy_many",
          [](store& s, const pieces& dsts, const pieces& srcs, const std::vector<std::size_t>& sizes,
             std::uintptr_t stream, bool wait) {
            check_pieces(dsts, srcs, sizes, "raw_copy_many");
            std::vector<aqua::copy_op> ops;
            ops.reserve(sizes.size());
            for (std::size_t i = 0; i < sizes.size(); ++i)
              ops.push_back({as_ptr(dsts[i]), as_ptr(srcs[i]), sizes[i]});
            py::gil_scoped_release release;
            s.raw_copy_many(ops, stream, wait);
          },
          py::arg("dsts"), py::arg("srcs"), py::arg("sizes"), py::arg("stream"),
          py::arg("wait") = false,
          "Copies on `stream` in one batched submission; `wait`: return once they ran on "
          "`stream` (that stream only, never the whole device).")
      .def("synchronize_stream", &store::synchronize_stream, py::arg("stream"), release_gil(),
           "Block until the work enqueued on `stream` so far has run.")
      .def_property_readonly("backend", [](const store& s) { return s.get_backend().name(); })
      .def_property_readonly("emulation", [](const store& s) { return s.get_backend().is_emulation(); })
      .def_property_readonly("device", &store::device)
      .def_property_readonly("policy", &store::policy)
      .def_property_readonly("chunk_bytes", [](const store& s) { return s.config().chunk_bytes; });
}
