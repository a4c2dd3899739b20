"""The key maps of a whole SD 1.x / 2.x / XL model (one per part), from the shared LDM<->diffusers tables."""
from __future__ import annotations

from ...models.keymaps import KeyMap, clip_keymap, openclip_keymap, unet_keymap, vae_keymap
from ...models.ldm_layout import SDXL_TE1_PREFIX, SDXL_TE2_PREFIX


def model_keymaps(family: str, unet, vae, text_encoder, text_encoder_2=None) -> tuple[KeyMap, ...]:
    """The (U-Net, VAE, text encoder) maps of built modules (meta or real) of an SD1/SD2 model; SDXL adds the map of
    `text_encoder_2` as a fourth."""
    unet_map = unet_keymap(unet.state_dict().keys(), unet.config.layers_per_block)
    vae_map = vae_keymap(vae.state_dict().keys(), len(vae.config.block_out_channels))
    te_names = text_encoder.state_dict().keys()
    if family == "sdxl":
        if text_encoder_2 is None:
            raise ValueError("an SDXL model needs text_encoder_2")
        return (unet_map, vae_map, clip_keymap(te_names, SDXL_TE1_PREFIX + "text_model."),
                openclip_keymap(text_encoder_2.state_dict().keys(), SDXL_TE2_PREFIX))
    te_map = openclip_keymap(te_names) if family == "sd2" else clip_keymap(te_names)
    return unet_map, vae_map, te_map
