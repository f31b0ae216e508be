"""Fine-tuning: tasks, data, optimizers, the training loop, LoRA adapters and data parallelism."""
