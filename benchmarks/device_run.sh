#!/usr/bin/env bash
# One GPU session's checks, in order of importance, each under its own time limit (benchmarks/README.md):
#   1. build the C++/CUDA extension (JIT, ninja, sm_90 only) and run the op and AdvCAM tests on cuda;
#   2. benchmarks/advcam_speed.py at the AdvCAM issue's shapes (ResNet-50, 500x375, 4 scales, 27 steps):
#      ceilings, FLOPs, step parts, reference loop, ours with each speed option;
#   3. the same with cudnn.benchmark, for the graphed variants;
#   4. benchmarks/seed_study.py on the embedded dataset: true-float32 AdvCAM seeds against the fast paths.
# Results go to $OUT (default benchmarks/results/device). Inputs: DATA (prepared dataset folder) and MODEL
# (its classifier), default .devcarry/{synthetic,classifier.pt}; Python packages the machine lacks can come
# as wheels in .whl/ (installed to /tmp/site).
set -u
OUT=${OUT:-benchmarks/results/device}
DATA=${DATA:-.devcarry/synthetic}
MODEL=${MODEL:-.devcarry/classifier.pt}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SPEED_SHAPE=${SPEED_SHAPE:---model resnet50 --size 500x375 --steps 27}  # a smaller one for a dry run on CPU
read -r -a SHAPE_ARGS <<< "$SPEED_SHAPE"  # several options in one variable
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ADVCAM_PROGRESS=0 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/advcam_ext}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
stamp() { echo "== $(date -u +%T) $*"; }

{
  stamp environment
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total,temperature.gpu --format=csv
  nvcc --version | tail -n 2
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  stamp build extension
  start=$(date +%s)
  timeout 200 "$PY" -c "from advcam.ops import load_extension; m = load_extension(); print('has_cuda', m.has_cuda())"
  echo "build rc $? in $(( $(date +%s) - start )) s"
  stamp tests
  timeout 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_advcam.py tests/test_models.py
  echo "pytest rc $?"
} 2>&1 | tee "$OUT/build_and_tests.log" | tail -n 25

stamp speed
timeout "${SPEED_LIMIT:-200}" "$PY" benchmarks/advcam_speed.py "${SHAPE_ARGS[@]}" --images 4 --device "$DEVICE" \
  --fast-variants --roofline --reference-images 2 --out "$OUT" 2>&1 | tee "$OUT/speed.log"
echo "speed rc ${PIPESTATUS[0]}"

stamp speed with cudnn.benchmark
timeout "${CUDNN_LIMIT:-100}" "$PY" benchmarks/advcam_speed.py "${SHAPE_ARGS[@]}" --images 4 --device "$DEVICE" \
  --fast-variants --variants ours-fast,ours-tf32-fast --cudnn-benchmark --skip-reference --tag cudnn-benchmark \
  --out "$OUT" 2>&1 | tee "$OUT/speed-cudnn-benchmark.log"
echo "speed (cudnn.benchmark) rc ${PIPESTATUS[0]}"

stamp seeds
FAST='cam.advcam.channels_last=true;cam.advcam.fold_batchnorm=true;cam.advcam.cuda_graph=true'
timeout "${SEEDS_LIMIT:-170}" "$PY" benchmarks/seed_study.py --data "$DATA" --model "$MODEL" --images "${SEED_IMAGES:-120}" \
  --device "$DEVICE" --compare --variant fp32=cam.method=advcam \
  --variant "tf32-fast=cam.method=advcam;cam.advcam.precision=tf32;$FAST" \
  --variant "bf16-fast=cam.method=advcam;cam.advcam.precision=bf16;$FAST" \
  --variant "bf16=cam.method=advcam;cam.advcam.precision=bf16" \
  --out "$OUT/seeds-precision.json" 2>&1 | tee "$OUT/seeds.log"
echo "seeds rc ${PIPESTATUS[0]}"
stamp "done"
