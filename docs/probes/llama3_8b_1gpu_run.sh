#!/usr/bin/env bash
# The issue-18 measurement on the lent one-GPU H200: longtrain's plan and the ALST recipe, Llama-3-8B shape,
# LoRA rank 16, one after the other in one call (see docs/probes/llama3_8b_1gpu.py). Usage, from the repo root on
# the GPU machine, with the wheels of .gpu-min carried: bash docs/probes/llama3_8b_1gpu_run.sh SEQ STEPS
seq=${1:-131072}; steps=${2:-2}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu-min/*.whl
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; free -g; nproc
  python3 -c "import torch, deepspeed, peft; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'peft', peft.__version__)"; } > $OUT/machine.txt 2>&1
plan=profiles/runs/h200_2026-12-01_llama3-8b-1gpu/longtrain_$((seq / 1024))k.plan.yaml
timeout ${LT_TIMEOUT:-200} python3 docs/probes/llama3_8b_1gpu.py --recipe longtrain --seq-len $seq --steps $steps \
  --plan $plan --out $OUT/longtrain_$((seq / 1024))k.jsonl > $OUT/longtrain.log 2>&1
echo "longtrain exit $?" >> $OUT/machine.txt
timeout ${ALST_TIMEOUT:-230} python3 docs/probes/llama3_8b_1gpu.py --recipe alst --seq-len $seq --steps $steps \
  --out $OUT/alst_$((seq / 1024))k.jsonl > $OUT/alst.log 2>&1
echo "alst exit $?" >> $OUT/machine.txt
grep -h "step \|whole call\|Error\|error" $OUT/longtrain.log $OUT/alst.log | tail -20
cat $OUT/machine.txt
