"""Torch-free facts of one model family: what the GUI, pre-flight, the option schema and metadata need to know
without loading a model. Each family package declares its `FamilySpec`s; `sd_scripts.families` collects them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


# Options of the DDPM step (sd-scripts' train_util / custom_train_functions) that flow-matching families cannot use,
# with the reason: their FamilySpec.refused_options include these (sd-scripts' FLUX.1 / SD3 trainers never read them)
DDPM_ONLY_OPTIONS: Mapping[str, str] = {
    "noise_offset": "offset noise is a DDPM option; flow matching draws plain Gaussian noise",
    "noise_offset_random_strength": "offset noise is a DDPM option; flow matching draws plain Gaussian noise",
    "adaptive_noise_scale": "offset noise is a DDPM option; flow matching draws plain Gaussian noise",
    "multires_noise_iterations": "multires noise is a DDPM option; flow matching draws plain Gaussian noise",
    "multires_noise_discount": "multires noise is a DDPM option; flow matching draws plain Gaussian noise",
    "zero_terminal_snr": "it rescales a DDPM beta schedule; flow matching reaches pure noise at sigma = 1 already",
    "min_snr_gamma": "min-SNR weighting is a DDPM option; use weighting_scheme",
    "scale_v_pred_loss_like_noise_pred": "it rescales a DDPM v-prediction loss by SNR; use weighting_scheme",
    "v_pred_like_loss": "it adds a DDPM v-prediction loss by SNR; use weighting_scheme",
    "debiased_estimation_loss": "it weights a DDPM loss by SNR; use weighting_scheme",
}


@dataclass(frozen=True)
class MemoryFacts:
    """Rough figures for the GUI's memory estimate (GB, and billions of parameters a full fine-tune trains)."""

    weights_gb: float  # every part in fp16
    trainable_b: float  # parameters of the denoiser + text encoders a full fine-tune trains
    activations_gb: float  # per image at the native resolution, fp16


@dataclass(frozen=True)
class FamilySpec:
    """Static facts of one family. `family_class` is 'module:Class' of its torch side (imported only to train)."""

    name: str
    label: str
    family_class: str
    bucket_step: int
    default_resolution: int
    vae_scaling_factor: float
    base_model_version: str  # kohya `ss_base_model_version`
    modelspec_architecture: str  # `modelspec.architecture` of a full model ('/lora' etc. appended for adapters)
    modelspec_implementation: str  # of adapters (full checkpoints use the trainer's own)
    memory: MemoryFacts
    learning_rates: Mapping[str, float]  # trainer ('network', 'db', 'finetune', 'ti') -> default learning rate
    vae_shift_factor: float = 0.0
    latent_cache_suffix: str = "_sd"
    lora_unet_prefix: str = "lora_unet"
    lora_te_prefixes: tuple[str, ...] = ("lora_te",)
    ss_v2: bool = False
    # v-prediction variant (SD 2.x 768-v): its native resolution and names
    supports_v_prediction: bool = False
    v_default_resolution: int | None = None
    v_base_model_version: str | None = None
    v_modelspec_architecture: str | None = None
    trainers: frozenset = frozenset({"network", "db", "finetune", "ti"})
    options: frozenset = frozenset()  # the family-specific options (schema: family_specific=True) it accepts
    scripts: tuple[str, ...] = ()  # sd-scripts script names made for this family only (e.g. sdxl_train_network)
    text_encoder_cache: bool = False  # supports cache_text_encoder_outputs
    # False: the family's LoRA never adapts its text encoders (sd-scripts' text-encoder train flags all off); the
    # network trainer then runs as with network_train_unet_only (frozen encoders: memoised, cacheable)
    lora_text_encoders: bool = True
    # the text-encoder output cache takes whole-caption dropout (caption_dropout_rate / _every_n_epochs): a dropped
    # caption is "" and "" is encoded once more (sd-scripts' Anima; its dropped conditioning is what "" encodes to)
    te_cache_caption_dropout: bool = False
    clip_skip: bool = False  # clip_skip means something for it
    ti_keys: tuple[str, ...] = ("emb_params",)  # textual-inversion file keys, one per text encoder
    kohya_ss_flags: tuple[str, ...] = ()  # kohya_ss config checkboxes that mean this family (e.g. 'sdxl')
    tiny_builder: str = ""  # 'module:function' writing tiny test/demo models (sd_scripts.tools.tiny_model)
    tiny_variants: Mapping[str, Mapping] = field(default_factory=dict)  # CLI name -> builder keyword arguments
    # trainer kind -> the script that trains this family; when set, the generic scripts (train_network, ...) refuse
    # the family's models naming that script (SDXL leaves it empty: train_network trains SDXL too)
    trainer_scripts: Mapping[str, str] = field(default_factory=dict)
    # options every family has that this one cannot use -> the reason (refused when set)
    refused_options: Mapping[str, str] = field(default_factory=dict)
    # variant (Detected.variant) -> option -> why a model of that variant cannot use it
    variant_refused_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # refuse family-specific options of other families (e.g. v_parameterization) instead of ignoring them
    strict_options: bool = True
    # option -> the values it takes for this family (the schema's choices are the union over the families)
    option_values: Mapping[str, tuple] = field(default_factory=dict)
    # tiny variant -> {option: file name} of what its builder writes with layout 'single' into the --out folder
    # (the denoiser under 'pretrained_model_name_or_path', part files under their options); variants left out
    # write one file, `tiny-<variant>.safetensors` (see `families.tiny_files`)
    tiny_files: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # the loading options (declared in sd_scripts/options.py) naming separate files of a whole model that the
    # family's loader reads (text encoders, autoencoder, adapters its single file may not hold): the tools that load
    # a whole model (merge_lora, extract_lora_from_models, ...) offer them and pass the given ones to the loader
    part_files: tuple[str, ...] = ()
    # kohya_ss GUI config keys that kohya_ss uses only when this family's checkbox (kohya_ss_flags) is on ->
    # our option, or 'network_args:<key>' for a key that becomes a network_args item
    kohya_ss_keys: Mapping[str, str] = field(default_factory=dict)
    # kohya_ss GUI config keys of this family that this trainer cannot honour -> the reason (reported on import)
    kohya_ss_unsupported: Mapping[str, str] = field(default_factory=dict)

    def default_resolution_for(self, v_pred: bool = False) -> int:
        """The native training resolution (SD 2.x v-prediction models are 768 px models)."""
        return self.v_default_resolution if v_pred and self.v_default_resolution else self.default_resolution

    def base_model_version_for(self, v_pred: bool = False) -> str:
        return self.v_base_model_version if v_pred and self.v_base_model_version else self.base_model_version

    def architecture_for(self, v_pred: bool = False, adapter: str | None = None) -> str:
        """`modelspec.architecture`, with '/<adapter>' ('lora', 'textual-inversion') for adapter files."""
        arch = self.v_modelspec_architecture if v_pred and self.v_modelspec_architecture \
            else self.modelspec_architecture
        return f"{arch}/{adapter}" if adapter else arch

    def accepts_option(self, name: str) -> bool:
        return name in self.options
