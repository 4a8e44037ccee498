"""Measurement in one place: the layer-stack benchmark (`bench`), the reader of its profiler traces (`trace`), the
torch hardware measurements behind `longtrain profile hardware` (`hardware`) and the fit of a profile's calibration
factors to bench rows (`calibration`).

Measurement imports the runtime (orchestrator) and the planner; only the CLI commands `launch/*_command.py` import
it (nothing in orchestrator/, planner/ or spec/ does).
"""
