"""What runs inside a training worker: config, model, data, DeepSpeed loop, metrics, checkpoints."""
