"""Deliberately worse variants against the loss-curve criterion of tests/test_compression.py; run from the repo root:
`PYTHONPATH=. python docs/probes/loss_criterion_variants.py` (2 cores, ~65 s). Output 2026-11-26:
paper i.i.d. WTA-CRS@0.7: +2.34% (+3.33%, -3.21%, +6.90%) -> FAILS
WTA-CRS@0.3 (systematic): +2.71% (+2.74%, +0.39%, +4.99%) -> FAILS
WTA-CRS@0.1 (systematic): +16.27% (+9.12%, +16.82%, +22.88%) -> FAILS
WTA-CRS@0.7 without importance weights (uniform n/k): +0.67% (+1.72%, +0.76%, -0.46%) -> passes
S2A int4 with round-down codes (no stochastic rounding): -0.24% (+2.76%, -1.92%, -1.55%) -> passes
int8 linear inputs with round-down codes: -1.79% (+0.92%, -3.70%, -2.60%) -> passes
"""
import sys
import torch
sys.path.insert(0, "tests")
import test_compression as t
from orchestrator.memory import quant_int8, wta_crs

exact = {s: t._loss_curve([], s) for s in t.LOSS_SEEDS}
orig_draw, orig_noise = wta_crs.draw_rows, quant_int8._block_noise

def report(name, overrides):
    gap, gaps = t.loss_gap(overrides, exact)
    print(f"{name}: {gap:+.2%} ({', '.join(f'{g:+.2%}' for g in gaps)}) -> {'FAILS' if abs(gap) >= t.LOSS_BOUND else 'passes'}", flush=True)

wta_crs.draw_rows = lambda p, k, generator=None, num_draws=1, scheme=None: orig_draw(p, k, generator, num_draws, "wta_crs")
report("paper i.i.d. WTA-CRS@0.7", ["compression.wta_crs_keep_ratio=0.7"])
wta_crs.draw_rows = orig_draw
report("WTA-CRS@0.3 (systematic)", ["compression.wta_crs_keep_ratio=0.3"])
report("WTA-CRS@0.1 (systematic)", ["compression.wta_crs_keep_ratio=0.1"])
def no_ht(p, k, generator=None, num_draws=1, scheme="systematic"):
    index, weight = orig_draw(p, k, generator, num_draws, scheme)
    return index, torch.full_like(weight, p.numel() / k)
wta_crs.draw_rows = no_ht
report("WTA-CRS@0.7 without importance weights (uniform n/k)", ["compression.wta_crs_keep_ratio=0.7"])
wta_crs.draw_rows = orig_draw
quant_int8._block_noise = lambda seed, block, shape, device: torch.zeros(shape, device=device)
report("S2A int4 with round-down codes (no stochastic rounding)", ["compression.silu=int4"])
report("int8 linear inputs with round-down codes", ["compression.linear_inputs=int8"])
