// The packed GGUF tile layout shared by the block matmul (gguf_matmul.cpp) and the NEON tiles (gguf_neon.h); torch-free
// so that the NEON tiles' test program builds without libtorch. The layout itself is described in gguf_matmul.cpp.
#pragma once

#include <cstdint>

namespace tokenmill::gguf {

constexpr int64_t kBlock = 32;  // weights per GGUF block (and per int8 activation scale)
constexpr int64_t kRows = 16;   // weight rows per tile: one fp32 lane each
constexpr int64_t kQ4TileBlockBytes = kRows * kBlock / 2;
constexpr int64_t kQ8TileBlockBytes = kRows * kBlock;

}  // namespace tokenmill::gguf
