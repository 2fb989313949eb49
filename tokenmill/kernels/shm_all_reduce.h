// Tensor parallelism's all-reduce between processes on one machine, through a shared memory mapping
// (shm_all_reduce.cpp; the Python side: tokenmill/parallel/shm.py).
#pragma once

#include <ATen/core/Tensor.h>

namespace tokenmill {

// Bytes a mapping needs for `world` ranks and partial sums of up to `capacity` elements.
int64_t shm_all_reduce_bytes(int64_t world, int64_t capacity);

// The sum over the `world` ranks of their `x` (contiguous fp32 or bf16, at most `capacity` elements), the same bits on
// every rank. `shared`: the uint8 mapping every rank holds (zeroed before the first call); `seq`: this call's number,
// 1, 2, 3... on every rank in the same order. Each rank writes its partial sum (as fp32) to its own slot, raises its
// flag to seq, waits for every other flag to reach seq, and adds the slots in rank order in fp32, rounding once to
// x's dtype. Calls alternate between two sets of slots: a rank can only begin call seq + 2 after every rank has reached
// call seq + 1, so by then all of them have read call seq's slots. Raises after `timeout_s` seconds of waiting (a
// rank that died).
at::Tensor shm_all_reduce(const at::Tensor& shared, const at::Tensor& x, int64_t rank, int64_t world, int64_t seq,
                          int64_t capacity, double timeout_s);

}  // namespace tokenmill
