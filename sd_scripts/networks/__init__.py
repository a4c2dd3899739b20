"""Adapters trained on top of a frozen model: kohya-format LoRA/LoCon (lora.py) and the network_module registry."""
