"""The contract between the planner and the runtime: torch-free and solver-free.

Why a package of its own: the planner (PuLP, on a laptop) and the runtime (torch, in a worker) must agree on the
job config, the plan file, the saved-tensor inventory, FLOP counts, hardware profiles, the parallel sizes and the
error types, yet neither may import the other's heavy side. Everything here imports only the standard library,
PyYAML and OmegaConf.
"""
