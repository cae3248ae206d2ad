#include "aqua/error.hpp"

#include <cstdio>

namespace aqua {

std::string with_location(const std::string& what, const char* file, int line) {
  // __FILE__ is whatever path the build gave the compiler: keep it short and stable.
  std::string path = file;
  const auto cpp = path.rfind("/cpp/");
  if (cpp != std::string::npos) path = path.substr(cpp + 1);
  return what + " (" + path + ":" + std::to_string(line) + ")";
}

std::string format_bytes(std::size_t bytes) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 4) {
    v /= 1024.0;
    ++u;
  }
  char buf[48];
  if (u == 0)
    std::snprintf(buf, sizeof buf, "%zu B", bytes);
  else
    std::snprintf(buf, sizeof buf, "%.2f %s", v, units[u]);
  return buf;
}

}  // namespace aqua
