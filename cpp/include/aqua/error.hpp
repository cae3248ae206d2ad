// Error types of the core. The bindings map each one onto the Python hierarchy in
// aqua_offload/errors.py; nothing here knows about Python.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

namespace aqua {

/// Base of every error the core raises.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// No tier can hold the request. The message carries the numbers.
class out_of_memory_error : public error {
 public:
  out_of_memory_error(const std::string& what, std::size_t requested)
      : error(what), requested_(requested) {}
  std::size_t requested() const noexcept { return requested_; }

 private:
  std::size_t requested_;
};

/// A handle that is unknown, already fetched or freed, or busy in another call.
class invalid_handle_error : public error {
 public:
  using error::error;
};

/// An argument the core cannot accept (a device that does not exist, a zero-sized pool...).
class invalid_argument_error : public error {
 public:
  using error::error;
};

/// The backend (CUDA runtime, emulation worker) failed. Carries the runtime's error name
/// (e.g. "cudaErrorInvalidValue") and where the call was made, as RMM does.
class backend_error : public error {
 public:
  backend_error(const std::string& what, std::string error_name)
      : error(what), error_name_(std::move(error_name)) {}
  const std::string& error_name() const noexcept { return error_name_; }

 private:
  std::string error_name_;
};

/// Formats "what (file:line)", the file relative to the repository's cpp/ folder.
std::string with_location(const std::string& what, const char* file, int line);

/// Human-readable byte count ("1.50 GiB"), for error messages and logs.
std::string format_bytes(std::size_t bytes);

}  // namespace aqua

/// Throws `kind` with `msg` and where it was raised, as the CUDA checks do.
#define AQUA_FAIL(kind, msg) throw ::aqua::kind(::aqua::with_location((msg), __FILE__, __LINE__))
#define AQUA_EXPECTS(cond, kind, msg) \
  do {                                 \
    if (!(cond)) AQUA_FAIL(kind, msg); \
  } while (0)
