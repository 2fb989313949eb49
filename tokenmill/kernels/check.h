// TM_CHECK(cond, parts...): TORCH_CHECK with its message assembled here, integers through std::to_string.
//
// Why: with a pip torch built by Red Hat's devtoolset GCC and the extension built by the distribution's g++ (NVIDIA's
// Ubuntu 24.04 CUDA images: torch 2.11+cu130, g++ 13.3), streaming an integer into TORCH_CHECK's message crashes the
// process (SIGSEGV in std::ostream::_M_insert<long>) instead of raising; strings stream fine. A one-line extension
// shows it there (docs/benchmarks.md, "A crash found on that machine's CPU side"). The message is still only built
// when the check fails.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

namespace tokenmill::check {

inline std::string part(const char* text) { return text; }
inline std::string part(const std::string& text) { return text; }
inline std::string part(c10::ScalarType type) { return c10::toString(type); }

// (enable_if, not a requires clause: extensions may be built as C++17, as torch 2.11's builder does.)
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
inline std::string part(T value) {
  return std::to_string(value);
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string out;
  ((out += part(parts)), ...);
  return out;
}

}  // namespace tokenmill::check

#define TM_CHECK(cond, ...) TORCH_CHECK(cond, ::tokenmill::check::message(__VA_ARGS__))
