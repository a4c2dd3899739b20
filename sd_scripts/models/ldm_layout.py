"""Key prefixes of the original (LDM / SGM) single-file layout of Stable Diffusion checkpoints (torch-free).

Shared by the key maps (`keymaps.py`) and the families that read this layout."""

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."  # CLIP-L, transformers layout
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP-bigG, OpenCLIP layout
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."  # the refiner has only the bigG encoder, as embedder 0
