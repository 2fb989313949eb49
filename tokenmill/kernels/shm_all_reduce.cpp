// Why: over gloo, each of the two all-reduces per layer crosses the loopback TCP stack, which costs about a
// millisecond however small the tensor; a decode step of one sequence all-reduces a single row per call. Here the
// ranks meet in memory they all map: a store, a flag and a spin.
// The flags use GCC's __atomic builtins on the mapping (C++17: no std::atomic_ref).

#include "shm_all_reduce.h"

#include "check.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <chrono>
#include <cstring>
#include <sched.h>
#include <string>
#include <vector>

namespace tokenmill {
namespace {

constexpr int64_t kFlagStride = 64;  // one cache line per rank's flag

int64_t* flag(uint8_t* base, int64_t rank) { return reinterpret_cast<int64_t*>(base + rank * kFlagStride); }

float* slot(uint8_t* base, int64_t world, int64_t capacity, int64_t set, int64_t rank) {
  return reinterpret_cast<float*>(base + world * kFlagStride) + (set * world + rank) * capacity;
}

void wait_for(uint8_t* base, int64_t world, int64_t seq, double timeout_s) {
  const auto start = std::chrono::steady_clock::now();
  for (int64_t j = 0; j < world; ++j) {
    for (int64_t spins = 0; __atomic_load_n(flag(base, j), __ATOMIC_ACQUIRE) < seq; ++spins) {
      if (spins % 1024 != 1023) continue;
      sched_yield();  // more ranks than cores: let the one we wait for run
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      TM_CHECK(waited < timeout_s, "shared-memory all-reduce: rank ", std::to_string(j), " did not arrive within ",
               std::to_string(timeout_s), " s");
    }
  }
}

template <typename T>
void reduce(uint8_t* base, int64_t world, int64_t capacity, int64_t set, T* out, int64_t n) {
  std::vector<const float*> slots(world);
  for (int64_t j = 0; j < world; ++j) slots[j] = slot(base, world, capacity, set, j);
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float sum = slots[0][i];
      for (int64_t j = 1; j < world; ++j) sum += slots[j][i];
      out[i] = static_cast<T>(sum);
    }
  });
}

}  // namespace

int64_t shm_all_reduce_bytes(int64_t world, int64_t capacity) {
  return world * kFlagStride + 2 * world * capacity * static_cast<int64_t>(sizeof(float));
}

at::Tensor shm_all_reduce(const at::Tensor& shared, const at::Tensor& x, int64_t rank, int64_t world, int64_t seq,
                          int64_t capacity, double timeout_s) {
  TM_CHECK(shared.scalar_type() == at::kByte && shared.is_contiguous() && shared.device().is_cpu(),
           "shared must be a contiguous uint8 CPU tensor");
  TM_CHECK(world >= 1 && rank >= 0 && rank < world && seq >= 1 && capacity >= 1, "bad rank, world, seq or capacity");
  TM_CHECK(shared.numel() >= shm_all_reduce_bytes(world, capacity), "the mapping is smaller than world and capacity need");
  TM_CHECK(x.device().is_cpu() && x.is_contiguous() && x.numel() <= capacity,
           "x must be a contiguous CPU tensor of at most capacity elements");
  TM_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  uint8_t* base = shared.data_ptr<uint8_t>();
  const int64_t set = seq & 1, n = x.numel();
  float* mine = slot(base, world, capacity, set, rank);
  if (x.scalar_type() == at::kFloat) {
    std::memcpy(mine, x.data_ptr<float>(), n * sizeof(float));
  } else {
    const c10::BFloat16* src = x.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < n; ++i) mine[i] = static_cast<float>(src[i]);
  }
  __atomic_store_n(flag(base, rank), seq, __ATOMIC_RELEASE);
  wait_for(base, world, seq, timeout_s);
  at::Tensor out = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) {
    reduce(base, world, capacity, set, out.data_ptr<float>(), n);
  } else {
    reduce(base, world, capacity, set, out.data_ptr<c10::BFloat16>(), n);
  }
  return out;
}

}  // namespace tokenmill
