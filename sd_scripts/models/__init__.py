"""SD1.x/SD2.x/SDXL model stack: torch-free family facts (families, detect), bundled configs and tokenizer,
LDM<->diffusers key maps, loading a single file or diffusers folder into a ModelBundle, and saving it back (loading,
saving)."""
