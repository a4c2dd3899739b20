"""What model families share: the ModelBundle, lazy single-file reading (checkpoint), the LDM<->diffusers key maps
and layout prefixes, the bundled CLIP tokenizer, atomic safetensors writing, and `load_model`, which asks the family
registry (sd_scripts.families) which family a file is and lets that family load it."""
