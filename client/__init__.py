"""The ClientApp: local LoRA fine-tuning of the received adapter."""
