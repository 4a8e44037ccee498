"""Typed job configuration (see `schema`) and its loader (see `loader`)."""

from spec.config.loader import DEFAULT_CONFIG, job_to_yaml, list_shipped_configs, load_job_config
from spec.config.presets import MODEL_PRESETS
from spec.config.schema import (TOKEN_BLOCK, CheckpointConfig, ClusterConfig, CompressionConfig, DataConfig,
                                        JobConfig, MetricsConfig, ModelConfig, OptimConfig, ParallelConfig,
                                        PlanConfig, RopeScalingConfig, RunConfig, TokenElimConfig,
                                        TrainConfig)

__all__ = ["DEFAULT_CONFIG", "MODEL_PRESETS", "TOKEN_BLOCK", "CheckpointConfig", "ClusterConfig",
           "CompressionConfig", "DataConfig", "JobConfig", "MetricsConfig", "ModelConfig", "OptimConfig",
           "ParallelConfig", "PlanConfig", "RopeScalingConfig", "RunConfig", "TokenElimConfig", "TrainConfig",
           "job_to_yaml", "list_shipped_configs", "load_job_config"]
