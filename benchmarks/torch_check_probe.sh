#!/usr/bin/env bash
# Whether this machine's torch and g++ crash on an integer in a TORCH_CHECK message (docs/benchmarks.md, "A crash
# found on that machine's CPU side, and its fix"): a one-function extension built with four sets of flags, each
# check called in its own process; prints the toolchain, the outcome per check and the stream symbols the extension
# carries. Needs torch and g++ only; wheels under .whl/ are installed first where the machine lacks packages.
#   OUT=/tmp/probe bash benchmarks/torch_check_probe.sh
set -u
OUT=${OUT:-/tmp/probe_out}; mkdir -p "$OUT"
exec > >(tee "$OUT/probe.log") 2>&1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
g++ --version | head -1; ldd --version | head -1
python3 -c "import torch; print('torch', torch.__version__, 'cxx11abi', torch.compiled_with_cxx11_abi()); print(torch.__config__.show()[:700])"
python3 -c "import torch, re; print([l.split()[-1] for l in open('/proc/self/maps') if 'stdc++' in l][:1])"
strings -a "$(python3 -c 'import torch,os; print(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))')" | grep -m3 "GCC: ("
mkdir -p /tmp/probe
cat > /tmp/probe/p.cpp <<'EOF'
#include <torch/extension.h>
#include <string>
void check_long(int64_t n) { TORCH_CHECK(n < 0, "n is ", n); }
void check_str(int64_t n) { TORCH_CHECK(n < 0, "n is ", std::to_string(n)); }
void check_plain(int64_t n) { TORCH_CHECK(n < 0, "n is positive"); }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("check_long", &check_long); m.def("check_str", &check_str); m.def("check_plain", &check_plain);
}
EOF
i=0
for flags in "-O2" "-O3 -fopenmp" "-O3 -ffp-contract=off -fno-math-errno -fopenmp -march=x86-64-v3" "-O3 -fopenmp -D_GLIBCXX_USE_CXX11_ABI=1"; do
  i=$((i+1))
  FLAGS="$flags" NAME="probe$i" timeout 150 python3 - <<'EOF'
import os, subprocess, sys
flags = os.environ["FLAGS"].split()
code = f"""
import torch
from torch.utils.cpp_extension import load
m = load(name={os.environ['NAME']!r}, sources=['/tmp/probe/p.cpp'], extra_cflags={flags!r},
         extra_ldflags={['-fopenmp'] if '-fopenmp' in flags else []!r}, verbose=False)
print('so', m.__file__)
"""
r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
print(flags, "build rc", r.returncode, r.stdout.strip(), r.stderr[-400:] if r.returncode else "")
so = r.stdout.strip().split()[-1] if r.returncode == 0 else None
if so:
    for f in ("check_plain", "check_str", "check_long"):
        c = f"import torch, importlib.util as u\ns=u.spec_from_file_location({os.environ['NAME']!r}, {so!r}); m=u.module_from_spec(s); s.loader.exec_module(m)\ntry:\n    m.{f}(5)\nexcept RuntimeError as e:\n    print('RuntimeError', str(e).splitlines()[0][:60])"
        r2 = subprocess.run([sys.executable, "-c", c], capture_output=True, text=True)
        print("  ", f, "rc", r2.returncode, r2.stdout.strip()[:100], r2.stderr.strip()[-200:] if r2.returncode else "")
    print(subprocess.run(f"nm -C {so} | grep -i 'M_insert' | head -5; ldd {so} | grep -i 'stdc\\|gomp'", shell=True,
                         capture_output=True, text=True).stdout)
EOF
done
