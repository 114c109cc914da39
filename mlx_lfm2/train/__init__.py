"""Fine-tuning: data, losses, the training loop and the lora / fuse commands."""
