#!/bin/sh
# Verifies the fused SSM kernels on this machine's GPU and measures them. Needs MLX with a GPU
# backend (an Apple-silicon Mac, or Linux with `pip install 'mlx[cuda13]'`) and the dev extra.
#   sh scripts/gpu-check.sh [OUTDIR]      # logs go to OUTDIR (default: gpu-check/)
# Steps: the kernel and scan tests (fused vs the plain recurrence, on the GPU), bench/ssm_kernel.py,
# bench/memory.py (full-size QLoRA step) at 512 and 2048 tokens with recompute on and off, and the
# model tests with the fused scan inside. Each long step has a time limit (STEP_TIMEOUT seconds).
out=${1:-gpu-check}
py=${PYTHON:-python3}
limit=${STEP_TIMEOUT:-150}
mkdir -p "$out"
status=0
"$py" -c "import mlx.core as mx; from bit_axon.layers.scan_kernels import kernel_backend; \
print('mlx', mx.__version__, mx.default_device(), 'kernel backend:', kernel_backend(), mx.device_info())" \
    2>&1 | tee "$out/device.txt"
timeout "$limit" "$py" -m pytest -q -p no:cacheprovider tests/layers/test_scan_kernels.py \
    tests/layers/test_scan.py 2>&1 | tee "$out/pytest-scan.log"
grep -q " passed" "$out/pytest-scan.log" && ! grep -q " failed\| error" "$out/pytest-scan.log" || status=1
timeout "$limit" "$py" bench/ssm_kernel.py 2>&1 | tee "$out/ssm_kernel.txt"
for L in 512 2048; do
    timeout "$limit" "$py" bench/memory.py --seq-len "$L" --recompute both 2>&1 | tee "$out/memory-$L.txt"
done
timeout "$limit" "$py" -m pytest -q -p no:cacheprovider -x tests/test_model.py 2>&1 | tee "$out/pytest-model.log"
exit $status
