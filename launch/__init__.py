"""The `longtrain` CLI, Ray connection and Ray Train wiring, per-node aggregation, console output."""
