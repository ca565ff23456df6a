"""The model: building it from a HF checkpoint or config, LoRA adapters, FSDP2 sharding, losses, the evaluate/export load."""
