// The packed GGUF tile layout shared by the block matmul (gguf_matmul.cpp) and the NEON tiles (gguf_neon.h); torch-free
// so that the NEON tiles' test program builds without libtorch. The layout itself is described in gguf_matmul.cpp.
#pragma once

#include <cstdint>

namespace tokenmill::gguf {

constexpr int64_t kBlock = 32;  // weights per GGUF block (and per int8 activation scale)
constexpr int64_t kRows = 16;   // weight rows per tile: one fp32 lane each
constexpr int64_t kQ4TileBlockBytes = kRows * kBlock / 2;
constexpr int64_t kQ8TileBlockBytes = kRows * kBlock;

// Q6_K's scales for the 8-bit tiles, per row tile and 256-weight super-block (kQ6KBlocks blocks of 32): the 16 rows'
// f16 d (raw bits), then for each of the 16 sub-blocks of 16 weights the 16 rows' int8 sc. A sub-block's scale is
// d · sc, formed in fp32 as the tiles read it (exact: an 11-bit times an 8-bit significand).
constexpr int64_t kQ6KBlocks = 8;
constexpr int64_t kQ6KScaleBytes = 2 * kRows + 16 * kRows;

// One row tile's Q6_K scales (the tile's first super-block).
struct Q6KTileScales {
  const uint8_t* p;

  // The 16 rows' f16 d (raw bits) of block b's super-block, and their int8 sc of part `part` (0, 1) of block b.
  const uint8_t* d_bits(int64_t b) const { return p + (b / kQ6KBlocks) * kQ6KScaleBytes; }
  const int8_t* sc(int64_t b, int part) const {
    return reinterpret_cast<const int8_t*>(d_bits(b) + 2 * kRows + ((b % kQ6KBlocks) * 2 + part) * kRows);
  }
};

// A tile on the weights' first pass asks for its codes this far ahead of the block it reads: the hardware prefetchers
// alone leave its loads waiting on memory, from one activation row up (benchmarks/gguf_tiles.py, docs/benchmarks.md).
// The codes of a row tile and of the next one are contiguous, so the address ahead is what the same call reads next.
// A prefetch past the end of the weights cannot fault.
constexpr int64_t kPrefetchAhead = 4096;

// Prefetches the Bytes (a multiple of the 64-byte line) kPrefetchAhead past p.
template <int64_t Bytes>
inline void prefetch_ahead(const void* p) {
  const char* line = static_cast<const char*>(p) + kPrefetchAhead;
  for (int64_t l = 0; l < Bytes; l += 64) __builtin_prefetch(line + l);
}

// Scales per 32-weight block: 1 for a pointer to per-block scales (Q8_0, Q5_0), 2 for Q6_K's sub-blocks.
template <typename Scales>
constexpr int kScaleGroups = 1;
template <>
constexpr int kScaleGroups<Q6KTileScales> = 2;

// Chunks (k-pairs) of a Q8 tile-block under one scale: all 16, or 8 where a block has Groups = 2 scales (Q6_K's
// sub-blocks of 16 weights).
template <int Groups>
constexpr int64_t kQ8Pairs = 16 / Groups;

}  // namespace tokenmill::gguf
