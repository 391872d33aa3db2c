"""Training: typed config, DeepSpeed engine over Megatron-core parallel groups, the loop."""
