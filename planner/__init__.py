"""Pure-CPU planning: hardware profiles, cost model, MIPs, plan files (no torch.distributed, ray or deepspeed)."""
