#!/usr/bin/env bash
# One pass on a GPU machine, in this order: the CUDA tests, offline throughput of tokenmill vs transformers on the
# GPU (a random-weight model of the bundled model's shapes: benchmarks/random_weights.py), one stream, the kernels
# and GPU busy time of a decode step (benchmarks/step_profile.py), then the whole suite with device "auto" (= cuda there) for whatever breaks off the CPU. Logs and JSON go to $OUT.
#   benchmarks/random_weights.py spec .rw/spec.json   # beforehand, where the bundled model is installed
#   OUT=/tmp/cuda_check bash benchmarks/cuda_check.sh [SECONDS]   # a deadline for the whole pass (default 380)
set -uo pipefail
OUT=${OUT:-/tmp/cuda_check}
mkdir -p "$OUT"
deadline=$((SECONDS + ${1:-380}))
left() { echo $((deadline - SECONDS)); }
if compgen -G ".whl/*.whl" >/dev/null; then  # packages the machine lacks, brought as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# At most 8 files come back from a lent machine: the GPU's description goes into the CUDA tests' log.
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/test_cuda.log"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/test_cuda.log"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee -a "$OUT/test_cuda.log"
python3 benchmarks/random_weights.py write .rw/spec.json /tmp/random.gguf
common=(--model /tmp/random.gguf --device cuda --no-tqdm --threads "$(nproc)")
timeout 170 python3 benchmarks/offline_throughput.py "${common[@]}" --num-requests 128 --repeats 2 \
  --input-len-range 32,256 --output-len-range 32,256 --output "$OUT/offline_cuda.json" 2>&1 | tee "$OUT/offline.log"
timeout 120 python3 benchmarks/offline_throughput.py "${common[@]}" --num-requests 1 --repeats 2 \
  --input-len-range 32,32 --output-len-range 256,256 --output "$OUT/single_cuda.json" 2>&1 | tee "$OUT/single.log"
timeout 90 python3 benchmarks/step_profile.py --model /tmp/random.gguf --device cuda --dtype bfloat16 --batch 1 \
  --output "$OUT/step_profile.json" 2>&1 | tee -a "$OUT/single.log"
if [ "$(left)" -gt 30 ]; then
  # Every ISA level's kernels built once, one after the other, before the workers start: a build that a test's
  # timeout kills leaves the workers waiting on its lock with no library (seen on the H200 host).
  timeout "$(left)" python3 -c "from tokenmill.kernels import cpu_kernels, isa
for level in isa.supported_levels(isa.cpu_flags()): print(level, cpu_kernels(level).error)" 2>&1 | tail -8
  # SIGINT at the deadline: pytest then stops like on Ctrl-C and still writes its summary and the JUnit report.
  timeout -s INT "$(left)" python3 -m pytest -q -p no:cacheprovider -n 12 --timeout 300 -rfE \
    --junitxml="$OUT/suite.xml" tests > "$OUT/suite.log" 2>&1
  tail -5 "$OUT/suite.log"
fi
