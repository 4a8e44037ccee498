"""The 256K four-layer `longtrain train` plan measured on the lent H200 (profiles/runs/h200_2026-12-02_bench-arena-duplex/
train_256k_step1/plan.yaml, 61.62 GiB allocated), predicted by today's cost model: python3 docs/probes/train_256k_repredict.py"""
import yaml
from spec.config import load_job_config
from spec.hardware import load_profile
from spec.plan import LayerPlan
from planner.planning import predict_decisions
job = load_job_config("configs/llama7b4l_256k_1xh100.yaml", ["metrics.hardware_profile=h200_1x_lent", "plan.gpu_memory_fraction=0.5"])
profile = load_profile("h200_1x_lent")
d = yaml.safe_load(open("profiles/runs/h200_2026-12-02_bench-arena-duplex/train_256k_step1/plan.yaml"))
decisions = [LayerPlan(**{k: v for k, v in l.items()}) for l in d["layers"]]
plan = predict_decisions(job, profile, decisions)
p = plan.predicted
print("peak", p["peak_gpu_gib"], "step", p["step_seconds"], "static", p["static_gib"], "arena", plan.arena_bytes / 2**30)
print("vs measured 61.62 GiB: %+.1f%%" % ((p["peak_gpu_gib"] / 61.615 - 1) * 100))
