#!/usr/bin/env bash
# The issue-18 measurement on the lent one-GPU H200: longtrain's plan and the ALST recipe, Llama-3-8B shape,
# LoRA rank 16 (see docs/probes/llama3_8b_1gpu.py). Usage, from the repo root on the GPU machine, with
# .gpu-bundle/ (DeepSpeed and the other wheels the machine lacks, and its activate.sh) copied along:
#   bash docs/probes/llama3_8b_1gpu_run.sh SEQ STEPS [RECIPES] [KEY=VALUE ...]
# RECIPES: "longtrain alst" (default, one after the other), or one of them (one call each keeps a long step within
# the 10-minute limit of one command). KEY=VALUE: more overrides for longtrain's run, the ones its plan was made with
# (the worker refuses another plan). Its plan: profiles/runs/h200_2026-12-01_llama3-8b-1gpu/longtrain_<SEQ/1024>k
# .plan.yaml, or LT_PLAN. Each recipe's process is killed after LT_TIMEOUT / ALST_TIMEOUT seconds.
#   bash docs/probes/llama3_8b_1gpu_run.sh 131072 2                       # the 128K rows (both, one call)
#   bash docs/probes/llama3_8b_1gpu_run.sh 262144 2 longtrain             # 256K, one call each
#   bash docs/probes/llama3_8b_1gpu_run.sh 262144 1 alst
#   bash docs/probes/llama3_8b_1gpu_run.sh 327680 1 longtrain plan.gpu_memory_fraction=0.55 plan.host_memory_fraction=0.42
#   bash docs/probes/llama3_8b_1gpu_run.sh 327680 1 alst                  # whole-layer replay verified at 320K
# PROBE_FLAGS: flags for both recipes' probe, e.g. full fine-tuning of the 3B shape (its own plan file):
#   LT_PLAN=profiles/runs/h200_2026-12-02_llama3-3b-full/longtrain_128k.plan.yaml PROBE_FLAGS=--full-3b \
#     bash docs/probes/llama3_8b_1gpu_run.sh 131072 2
seq=${1:-131072}; steps=${2:-2}; recipes=${3:-longtrain alst}; shift $(( $# < 3 ? $# : 3 ))
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
source .gpu-bundle/activate.sh
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; free -g; nproc
  python3 -c "import torch, deepspeed, peft; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'peft', peft.__version__)"; } > $OUT/machine.txt 2>&1
k=$((seq / 1024))
plan=${LT_PLAN:-profiles/runs/h200_2026-12-01_llama3-8b-1gpu/longtrain_${k}k.plan.yaml}
for recipe in $recipes; do
  if [ "$recipe" = longtrain ]; then
    timeout ${LT_TIMEOUT:-560} python3 docs/probes/llama3_8b_1gpu.py --recipe longtrain --seq-len $seq --steps $steps \
      $PROBE_FLAGS --plan $plan --out $OUT/longtrain_${k}k.jsonl "$@" > $OUT/longtrain_${k}k.log 2>&1
  else
    timeout ${ALST_TIMEOUT:-560} python3 docs/probes/llama3_8b_1gpu.py --recipe alst --seq-len $seq --steps $steps $PROBE_FLAGS \
      --out $OUT/alst_${k}k.jsonl > $OUT/alst_${k}k.log 2>&1
  fi
  echo "$recipe ${k}k exit $?" >> $OUT/machine.txt
  nvidia-smi --query-gpu=memory.used --format=csv >> $OUT/machine.txt 2>&1
done
grep -h "step \|whole call\|Error\|error" $OUT/*_${k}k.log | tail -20
cat $OUT/machine.txt
