#!/usr/bin/env bash
# The checks this project could not run without a GPU, in one go (about 5-10 minutes on one modern GPU).
#   bash scripts/gpu_check.sh [OUT_DIR]        (default outputs/gpu_check; after `bash scripts/setup.sh` with
#                                               TORCH_SPEC="torch" so that a CUDA build of torch is installed)
# Then paste OUT_DIR/summary.txt into docs/benchmarks.md ("On a GPU") or an issue. Each step writes its own log;
# a failing step is reported and the others still run. Steps:
#   1. the layer in bfloat16, eager and torch.compile (inductor), against PEFT LoRA, at LLaMA-2-7B MLP shapes,
#      and the host-sync check (torch.cuda.set_sync_debug_mode("error") around a training step of the layer);
#   2. tests/test_kernels.py, whose layer-level dropout check also runs on the GPU when one is present, with
#      the compile, half-precision and layer tests (these stay on the CPU: a regression check of the checkout);
#   3. FSDP2 on the GPUs present: 2 ranks (NCCL) against one process with the same data order, if there are
#      2 GPUs; with one GPU, the same test on the CPU (gloo), as in the default suite;
#   4. a short SmolLM2-135M training: `loramoe demo --quick` (LoRAMoE and LoRA, 16 steps each, then evaluation).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
step() {  # step NAME TIMEOUT_S COMMAND...: run, log, and record the outcome and the time it took
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc, see $OUT/$name.log)") in $((SECONDS - start)) s" | tee -a "$SUMMARY"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: none"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
} | tee -a "$SUMMARY"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
[ "$GPUS" -ge 1 ] || { echo "no CUDA device visible to torch: nothing to check here" | tee -a "$SUMMARY"; exit 1; }

step device_bench 300 "$PY" benchmarks/device_bench.py --out "$OUT/device_bench.json"
step tests_on_gpu 300 "$PY" -m pytest -q -m "slow or not slow" tests/test_compile.py tests/test_kernels.py \
  tests/test_half_precision.py tests/test_layer.py
if [ "$GPUS" -ge 2 ]; then
  step fsdp_gpus 300 bash -c "'$PY' -m torch.distributed.run --nproc_per_node 2 tests/scripts/fsdp_train.py '$OUT/fsdp' \
    && '$PY' tests/scripts/fsdp_train.py '$OUT/fsdp_one' \
    && '$PY' -c \"import json,sys; a=json.load(open('$OUT/fsdp/losses.json')); b=json.load(open('$OUT/fsdp_one/losses.json')); print('2 GPUs', a); print('1 GPU ', b); sys.exit(max(abs(x-y) for x,y in zip(a,b)) > 1e-3)\""
else
  step fsdp_cpu 300 env CUDA_VISIBLE_DEVICES= "$PY" -m pytest -q tests/test_distributed.py -k fsdp2
fi
step smollm2_demo 420 "$PY" -m loramoe demo --quick --out "$OUT/demo"

"$PY" - "$OUT" >> "$SUMMARY" <<'PY'
import json, sys
out = sys.argv[1]
try:
    r = json.load(open(f"{out}/device_bench.json"))
except OSError:
    sys.exit(0)
print(f"device {r['device']}, torch {r['torch']}, {r['dtype']}, N={r['experts']} R={r['rank']}, sync check: {r['sync_check']}")
for layer in r["layers"]:
    print(f"shape {layer['shape'][0]}->{layer['shape'][1]}, tokens {layer['tokens']}: ms fwd+bwd (adapter / PEFT's adapter)")
    for name, row in layer["variants"].items():
        print(f"  {name:28s} {row['ms']:9.3f} ms  ({row['adapter / peft adapter']:.2f})")
PY
cat "$SUMMARY"
