#!/usr/bin/env bash
# Every GPU measurement of the package in one run, for a GPU machine lent for a few minutes.
#
# 1. The CUDA tests (tests/test_cuda.py): the methods and solvers on the device, no host sync.
# 2. benchmarks/solver_timing.py --device cuda: one solve of each aggregator at K = 3, 10, 40,
#    ours and TorchJD's weightings (TorchJD's CAGrad needs cvxpy, which is not carried: skipped).
# 3. benchmarks/end_to_end.py --device cuda: whole training steps at full size (NYUv2 and
#    CelebA shapes, the demo's GRU), ours, TorchJD's autojac and autogram, against a plain sum.
#
# The machine has PyTorch but neither TorchJD nor the package, and no network. Prepare here,
# once, from the repository root (the wheels are for the GPU image's Python 3.12):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl torchjd==0.18.0 qpsolvers==4.13.0 quadprog==0.1.14
#
# then run it there with `.whl` carried (the device tool: carry [".whl"]), from the repository
# root: `bash benchmarks/gpu.sh`. Without .whl the TorchJD rows are skipped. It writes
# solver_timing_cuda.json, end_to_end_cuda.json and gpu.log to $OUT (benchmarks/results when
# unset); copy them into benchmarks/results and run `python benchmarks/render.py`. About three
# minutes on an H200.
set -euo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    # A wheel for another Python stops nothing: the TorchJD rows are then skipped.
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl; then
        export PYTHONPATH=/tmp/site
    else
        echo "the wheels in .whl did not install: no TorchJD rows"
    fi
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch; assert torch.cuda.is_available(); print(torch.__version__)"
    python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py || echo "CUDA tests failed"
    python3 benchmarks/solver_timing.py --device cuda --out "$out"
    python3 benchmarks/end_to_end.py --device cuda --out "$out"
} 2>&1 | tee "$out/gpu.log"
