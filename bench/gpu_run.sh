#!/bin/bash
# One device call: install, the compiled kernel tests, then the benchmarks named in $@ (default: decode).
# Copies logs and results to $OUT. Usage on the GPU machine: bash bench/gpu_run.sh [decode] [jax] [store] [tests] [ab] [combine] [breakdown]
# (ab: bench/ab_kernels.py --kernel $AB_KERNEL, default imma; carry the _old_ files its --setup wrote)
set -o pipefail
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps -e .
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee $OUT/gpu.txt
for what in "${@:-decode}"; do
  case "$what" in
    tests) LMCACHE_TEST_DEVICE=cuda LMCACHE_TEST_BACKENDS=numpy,torch timeout ${TEST_TIMEOUT:-480} python3 -m pytest -q -x \
             tests/test_triton_kernels.py tests/test_paged.py -k "${TEST_K:-qrows or long_sequence or paged or imma}" \
             2>&1 | tail -25 | tee $OUT/tests.log ;;
    jaxtests) LMCACHE_TEST_DEVICE=cuda LMCACHE_TEST_BACKENDS=numpy,jax timeout ${JAXTEST_TIMEOUT:-300} python3 -m pytest -q -x \
             tests/test_pallas_kernels.py tests/test_pallas_int8.py tests/test_pallas_lanes.py tests/test_jax_functional.py \
             tests/test_jax_backend.py 2>&1 | tail -15 \
             | tee $OUT/jaxtests.log ;;
    decode) timeout ${DECODE_TIMEOUT:-420} python3 bench/decode_attention.py --out $OUT ${DECODE_ARGS:-} 2>&1 | tee $OUT/decode.log | tail -60 ;;
    jax) timeout ${JAX_TIMEOUT:-300} python3 bench/decode_attention_jax.py --out $OUT --budget ${JAX_BUDGET:-160} 2>&1 \
           | tee $OUT/jax.log | tail -30 ;;
    ab) timeout 300 python3 bench/ab_kernels.py --kernel ${AB_KERNEL:-imma} --out $OUT 2>&1 | tee $OUT/ab.log | tail -20 ;;
    breakdown) timeout 300 python3 bench/breakdown_imma.py --out $OUT 2>&1 | tee $OUT/breakdown.log | tail -60 ;;
    combine) timeout 200 python3 bench/combine_splits.py --out $OUT 2>&1 | tee $OUT/combine.log | tail -15 ;;
    store) timeout 300 python3 bench/store.py --out $OUT ${STORE_ARGS:-} 2>&1 | tee $OUT/store.log | tail -30 ;;
  esac
done
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee -a $OUT/gpu.txt
