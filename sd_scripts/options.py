"""THE option schema: every training option is declared here once, and nowhere else.

The trainers' argparse parsers, the `--config_file` TOML they read, the GUI's widgets and `config.toml` defaults,
preset keys and validation are all generated from `OPTIONS`. This module must stay torch-free (the GUI imports it).

Names, meanings and defaults follow kohya-ss/sd-scripts so that command lines and TOML files users already have run
unchanged. An option that is not declared here is an error naming it, never silently ignored.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

TRAINERS = ("network", "db", "finetune", "ti")
ALL_TRAINERS = frozenset(TRAINERS)


def _registered_families() -> tuple[str, ...]:
    from .families import family_names

    return family_names()


FAMILIES = _registered_families()  # every registered model family (sd_scripts.families)
ALL_FAMILIES = frozenset(FAMILIES)

# Widget/argparse groups, in the order the GUI shows them.
GROUPS = {
    "model": "Source model",
    "folders": "Folders",
    "dataset": "Dataset",
    "caption": "Captions",
    "bucket": "Aspect-ratio buckets",
    "network": "Network (LoRA)",
    "training": "Training",
    "optimizer": "Optimizer and learning rate",
    "noise": "Noise and loss",
    "precision": "Precision and memory",
    "sampling": "Sample images",
    "saving": "Saving",
    "metadata": "Metadata",
    "scaleout": "Compilation, multi-GPU and DeepSpeed",
    "logging": "Logging and control",
    "hub": "Hugging Face Hub",
}


@dataclass(frozen=True)
class Option:
    """One training option: its argparse flag, TOML key, GUI widget and checks all derive from this."""

    name: str
    type: type  # str, int, float or bool (bool = a flag that is off by default)
    default: Any
    help: str
    group: str
    choices: tuple | None = None
    trainers: frozenset = ALL_TRAINERS
    family_specific: bool = False  # only the families whose FamilySpec.options name it accept it
    nargs: str | None = None  # "*" for lists of strings (network_args, optimizer_args, ...)
    minimum: float | None = None
    maximum: float | None = None
    path: str | None = None  # "file", "dir", "file_or_dir", "out_dir" or "out_file": the GUI and pre-flight check it
    label: str | None = None
    secret: bool = False  # never written to presets, run TOMLs, config.toml or logs
    env: str | None = None  # a secret's environment variable: how the GUI hands it to the trainer
    refused: str | None = None  # accepted for sd-scripts command lines, but an error (with this reason) when set
    advanced: bool = False  # hidden behind "advanced" in the GUI
    check: Callable[[Any, dict], str | None] | None = None  # (value, all values) -> error message or None
    aliases: tuple = ()
    suggestions: tuple = ()  # known values the GUI offers while still taking any other (optimizer_type)

    @property
    def flag(self) -> str:
        return "--" + self.name

    @property
    def title(self) -> str:
        return self.label or self.name.replace("_", " ").capitalize()

    @property
    def families(self) -> frozenset:
        """The model families this option means something for (all, unless it is family-specific)."""
        if not self.family_specific:
            return ALL_FAMILIES
        from .families import all_families

        return frozenset(name for name, spec in all_families().items() if spec.accepts_option(self.name))

    def applies_to(self, trainer: str | None = None, family: str | None = None) -> bool:
        return (trainer is None or trainer in self.trainers) and (family is None or family in self.families)


def _number_list(value, _values):
    try:
        [float(v) for v in str(value).split(",")]
    except ValueError:
        return "must be comma-separated numbers, e.g. 1e-6,1e-6,..."
    return None


def _float_or_int(text: str) -> float:
    """lr_warmup_steps / lr_decay_steps: an int number of steps, or a float < 1 (or 'N%') meaning a fraction of the
    total steps."""
    text = str(text).strip()
    value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    return int(value) if value.is_integer() and value >= 1 else value


def _optimizer_name(value, _values):
    from .training.optim.registry import name_problem

    return name_problem(value)


def _non_negative_list(value, _values):
    items = value if isinstance(value, (list, tuple)) else [value]
    try:
        return None if all(v is None or float(v) >= 0 for v in items) else "learning rates must be 0 or more"
    except (TypeError, ValueError):
        return f"{value!r} is not a list of numbers"


def _positive(value, _values):
    return None if value is None or value > 0 else "must be greater than 0"


def _non_negative(value, _values):
    return None if value is None or value >= 0 else "must be 0 or more"


def _needs_noise_offset(value, values):
    return "needs noise_offset: set noise_offset too, or remove it" if values.get("noise_offset") is None else None


def _timestep_range(value, values):
    low = values.get("min_timestep") or 0
    return None if value is None or value >= low else f"must not be below min_timestep ({low})"


def _below_one(value, _values):
    return None if value is None or 0 <= value < 1 else "must be at least 0 and below 1"


def _save_format(value, values):
    if value in ("diffusers", "diffusers_safetensors") and values.get("network_module") is not None:
        return "a LoRA is saved as safetensors, ckpt or pt; diffusers folders are for full models"
    if value == "pt" and values.get("network_module") is None and values.get("token_string") is None:
        return "full models are saved as safetensors, ckpt or a diffusers folder"
    return None


def _resolution(value, _values):
    try:
        parse_resolution(value)
    except ValueError as e:
        return str(e)
    return None


def _log_with(value, values):
    if value in ("tensorboard", "all") and not values.get("logging_dir"):
        return f"{value} writes its logs under logging_dir: set logging_dir (or use log_with wandb)"
    return None


HUB_REPO_TYPES = ("model", "dataset", "space")


def _hub_repo_id(value, _values):
    parts = str(value).split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in str(value)):
        return f"{value!r} is not a Hub repository id: write it as 'user/name' (or 'organization/name')"
    return None


def _hub_repo_type(value, _values):
    return None if value in HUB_REPO_TYPES else f"{value!r} is not a Hub repository type: use one of {HUB_REPO_TYPES}"


def _hub_visibility(value, _values):
    return None if value in ("public", "private") else f"{value!r}: use 'public' or 'private'"


def _thumbnail(value, _values):
    if str(value).startswith("data:") or os.path.isfile(value):
        return None
    return f"{value!r} is neither an image file nor a data: URL: give the path of an existing image"


RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area")


def parse_face_crop_range(value: str | Sequence[float]) -> tuple[float, float]:
    """'2.0,4.0' (or [2.0, 4.0]) -> (2.0, 4.0): two positive numbers, the first not above the second."""
    parts = list(value) if isinstance(value, (list, tuple)) else [p for p in str(value).split(",") if p.strip()]
    try:
        low, high = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"expected two numbers 'MIN,MAX' such as 2.0,4.0, got {value!r}") from None
    if not 0 < low <= high:
        raise ValueError(f"expected 0 < MIN <= MAX, got {value!r}")
    return low, high


def _face_crop_range(value, _values):
    try:
        parse_face_crop_range(value)
    except ValueError as e:
        return str(e)
    return None


def parse_resolution(value: str | int | Sequence[int]) -> tuple[int, int]:
    """'512' -> (512, 512); '512,768' -> (512, 768) as (width, height)."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)):
        parts = [int(v) for v in value]
    else:
        parts = [int(p) for p in str(value).replace("x", ",").split(",") if p.strip()]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 64:
        raise ValueError(f"resolution must be 'SIZE' or 'WIDTH,HEIGHT' with sizes of at least 64, got {value!r}")
    return parts[0], parts[1]


DYNAMO_BACKENDS = ("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                   "fx2trt", "onnxrt", "tensort", "ipex", "tvm")  # sd-scripts' list (accelerate lacks some)

NET = frozenset({"network"})
NOT_TI = frozenset({"network", "db", "finetune"})
FULL = frozenset({"db", "finetune"})
FOLDER_TRAINERS = frozenset({"network", "db", "ti"})
NET_FT = frozenset({"network", "finetune"})
CAPTION_JSON = frozenset({"network", "finetune", "ti"})  # sd-scripts' trainers with in_json / dataset_repeats


def _network_module_names() -> tuple:
    from .networks.registry import network_module_names

    return network_module_names()


def _family_option_choices(option: str) -> tuple:
    from .families import option_choices

    return option_choices(option)


from .training.optim.registry import LR_SCHEDULERS as _LR_SCHEDULERS  # noqa: E402 - torch-free name tables
from .training.optim.registry import OPTIMIZER_EXAMPLES as _OPTIMIZER_EXAMPLES  # noqa: E402
from .training.optim.registry import OPTIMIZER_NAMES as _OPTIMIZER_NAMES  # noqa: E402

_O = Option
OPTIONS: tuple[Option, ...] = (
    # ---- model
    _O("pretrained_model_name_or_path", str, None, "Base model: a single-file checkpoint (.safetensors/.ckpt) or a "
       "diffusers folder.", "model", path="file_or_dir", label="Pretrained model"),
    _O("v2", bool, False, "The base model is SD 2.x (detected from the weights; this flag confirms it).", "model",
       family_specific=True),
    _O("v_parameterization", bool, False, "The base model predicts v (SD 2.x 768-v models).", "model",
       family_specific=True),
    _O("vae", str, None, "Use this VAE instead of the model's (single file or diffusers folder).", "model",
       path="file_or_dir", label="VAE override"),
    _O("tokenizer_cache_dir", str, None, "Accepted for sd-scripts compatibility; the CLIP tokenizers ship with this "
       "package, so nothing is downloaded.", "model", path="dir", advanced=True),
    _O("clip_skip", int, None, "Use the output of the N-th last text-encoder layer (2 for anime-style SD1 models).",
       "model", minimum=1, maximum=12, check=_positive),
    _O("max_token_length", int, None, "Caption length in tokens: 75 (default), 150 or 225.", "model",
       choices=(None, 75, 150, 225)),
    # ---- DiT families' part files and text encoding (FamilySpec.options says which family takes them)
    _O("clip_l", str, None, "CLIP-L text encoder file (clip_l.safetensors).", "model", path="file",
       trainers=NET_FT, family_specific=True, label="CLIP-L"),
    _O("t5xxl", str, None, "T5-XXL text encoder file (e.g. t5xxl_fp16.safetensors).", "model", path="file",
       trainers=NET_FT, family_specific=True, label="T5-XXL"),
    _O("ae", str, None, "Autoencoder file (ae.safetensors) or a diffusers VAE folder.", "model", path="file_or_dir",
       trainers=NET_FT, family_specific=True, label="Autoencoder"),
    _O("text_encoder", str, None, "Qwen2.5-VL text encoder file (qwen_2.5_vl_7b.safetensors; HunyuanImage-2.1).",
       "model", path="file", trainers=NET, family_specific=True, label="Qwen2.5-VL"),
    _O("byt5", str, None, "byT5 glyph text encoder file (byt5_small_glyphxl_fp16.safetensors; HunyuanImage-2.1).",
       "model", path="file", trainers=NET, family_specific=True, label="byT5"),
    _O("model_type", str, None, "Model type (told by the model file; given, it must match).", "model",
       choices=(None, *_family_option_choices("model_type")), trainers=NET_FT, family_specific=True),
    _O("t5xxl_max_token_length", int, None, "T5-XXL tokens per caption (default: 256 for schnell, 512 otherwise).",
       "model", minimum=1, maximum=512, check=_positive, trainers=NET_FT, family_specific=True),
    _O("apply_t5_attn_mask", bool, False, "Mask T5-XXL padding in the text encoder and the denoiser's attention.",
       "model", trainers=NET_FT, family_specific=True),
    _O("gemma2", str, None, "Gemma-2 2B text encoder file (gemma_2_2b_fp16.safetensors).", "model", path="file",
       trainers=NET_FT, family_specific=True, label="Gemma-2"),
    _O("gemma2_max_token_length", int, None, "Gemma-2 tokens per caption (default 256).", "model", minimum=1,
       check=_positive, trainers=NET_FT, family_specific=True),
    _O("system_prompt", str, "", "Text put before every caption (with ' <Prompt Start> ') when it is encoded.",
       "model", trainers=NET_FT, family_specific=True),
    _O("use_flash_attn", bool, False, "Use the flash-attention kernel in the denoiser (CUDA only; refused where the "
       "kernel is missing).", "model", trainers=NET_FT, family_specific=True, advanced=True),
    _O("use_sage_attn", bool, False, "SageAttention (inference-only in sd-scripts).", "model", trainers=NET_FT,
       family_specific=True, refused="SageAttention is inference-only (sd-scripts says so) and not installed here; "
       "use use_flash_attn or nothing"),
    # ---- Anima (sd-scripts' anima_train_network / anima_train)
    _O("qwen3", str, None, "Qwen3 text encoder: a single file (qwen_3_06b_base.safetensors) or a transformers folder.",
       "model", path="file_or_dir", trainers=NET_FT, family_specific=True, label="Qwen3"),
    _O("llm_adapter_path", str, None, "LLM adapter weights in a separate file (default: the adapter inside the DiT "
       "file).", "model", path="file", trainers=NET_FT, family_specific=True, advanced=True),
    _O("t5_tokenizer_path", str, None, "T5 tokenizer folder for the LLM adapter's token ids (default: the bundled "
       "google/t5-v1_1-xxl tokenizer).", "model", path="dir", trainers=NET_FT, family_specific=True, advanced=True),
    _O("qwen3_max_token_length", int, 512, "Qwen3 tokens per caption.", "model", minimum=1, check=_positive,
       trainers=NET_FT, family_specific=True),
    _O("t5_max_token_length", int, 512, "T5 tokens per caption (the LLM adapter's target tokens).", "model",
       minimum=1, check=_positive, trainers=NET_FT, family_specific=True),
    *(_O(f"{part}_lr", float, None, f"Learning rate of the {what} (default: learning_rate; 0 freezes them).",
         "optimizer", minimum=0, trainers=NET_FT, family_specific=True, advanced=True)
      for part, what in (("llm_adapter", "LLM adapter"), ("self_attn", "self-attention layers"),
                         ("cross_attn", "cross-attention layers"), ("mlp", "MLP layers"),
                         ("mod", "adaLN modulation layers"))),
    _O("vae_disable_cache", bool, False, "Disable the Qwen-Image VAE's causal frame cache (no effect on single "
       "images, which are one frame).", "precision", trainers=NET_FT, family_specific=True, advanced=True),
    _O("unsloth_offload_checkpointing", bool, False, "sd-scripts' asynchronous activation offload.", "precision",
       trainers=NET_FT, family_specific=True,
       refused="not implemented: use cpu_offload_checkpointing (gradient-checkpointing activations on the CPU) "
               "with gradient_checkpointing"),
    # ---- folders
    _O("train_data_dir", str, None, "Parent folder of the concept folders '<repeats>_<class tokens>'.", "folders",
       path="dir", trainers=FOLDER_TRAINERS | {"finetune"}, label="Image folder"),
    _O("reg_data_dir", str, None, "Parent folder of regularisation concept folders (same naming rule).", "folders",
       path="dir", trainers=FOLDER_TRAINERS | {"finetune"}, label="Regularisation folder"),
    _O("dataset_config", str, None, "Dataset TOML ([general], [[datasets]], [[datasets.subsets]]).", "folders",
       path="file"),
    _O("output_dir", str, None, "Where models, samples and state are written.", "folders", path="out_dir"),
    _O("output_name", str, None, "File name of the trained model, without extension.", "folders"),
    _O("logging_dir", str, None, "TensorBoard logs go here.", "folders", path="out_dir"),
    _O("log_prefix", str, None, "Prefix of the run folder name inside logging_dir.", "logging", advanced=True),
    _O("log_with", str, None, "Trackers for scalars: tensorboard (the default when logging_dir is set; needs it), "
       "wandb (Weights & Biases), or all (both).", "logging", choices=(None, "tensorboard", "wandb", "all"),
       check=_log_with, advanced=True),
    _O("log_tracker_name", str, None, "Project name in the trackers (default: network_train, dreambooth, finetuning "
       "or textual_inversion, after the trainer).", "logging", advanced=True),
    _O("log_tracker_config", str, None, "TOML file of the trackers' own settings, one table per tracker: [wandb] "
       "entity, tags, notes, ...; [tensorboard] flush_secs, ...", "logging", path="file", advanced=True),
    _O("wandb_run_name", str, None, "Name of the run in Weights & Biases.", "logging", advanced=True),
    _O("wandb_api_key", str, None, "Weights & Biases API key. Reaches the trainer as WANDB_API_KEY; never written "
       "to run files, presets or logs.", "logging", secret=True, env="WANDB_API_KEY", advanced=True),
    _O("log_config", bool, False, "Send the run's options to the trackers (secrets left out, paths as file names).",
       "logging", advanced=True),
    _O("console_log_file", str, None, "Write the log to this file instead of the console.", "logging",
       path="out_file", advanced=True),
    _O("console_log_simple", bool, False, "Plain log lines: the message only.", "logging", advanced=True),
    _O("output_config", bool, False, "Write the options given (without secrets and defaults) to the --config_file "
       "path, which must not exist yet, and exit without training.", "logging", advanced=True),
    # ---- dataset
    _O("resolution", str, "512", "Training resolution: SIZE or WIDTH,HEIGHT.", "dataset", check=_resolution),
    _O("train_batch_size", int, 1, "Images per step (per process).", "dataset", minimum=1, check=_positive),
    _O("caption_extension", str, ".caption", "Caption file extension.", "caption", aliases=("caption_extention",)),
    _O("shuffle_caption", bool, False, "Shuffle the tags of each caption on every draw.", "caption"),
    _O("caption_separator", str, ",", "Separator between tags.", "caption", advanced=True),
    _O("keep_tokens", int, 0, "Keep the first N tags in place when shuffling or dropping.", "caption", minimum=0,
       check=_non_negative),
    _O("keep_tokens_separator", str, "", "Tags before this separator stay fixed (a second one marks a fixed tail).",
       "caption", advanced=True),
    _O("secondary_separator", str, None, "Separator of tags that are shuffled and dropped as one.", "caption",
       advanced=True),
    _O("enable_wildcard", bool, False, "Captions may hold several lines and {a|b} choices.", "caption"),
    _O("caption_prefix", str, None, "Text put before every caption.", "caption"),
    _O("caption_suffix", str, None, "Text put after every caption.", "caption"),
    _O("caption_dropout_rate", float, 0.0, "Probability of training a step with an empty caption.", "caption",
       minimum=0, maximum=1),
    _O("caption_dropout_every_n_epochs", int, 0, "Drop every caption every N-th epoch.", "caption", minimum=0),
    _O("caption_tag_dropout_rate", float, 0.0, "Probability of dropping each tag.", "caption", minimum=0, maximum=1),
    _O("token_warmup_min", int, 1, "Tags used at the start of token warmup.", "caption", minimum=1, advanced=True),
    _O("token_warmup_step", float, 0, "Steps (or fraction of steps if < 1) until all tags are used.", "caption",
       minimum=0, advanced=True),
    _O("weighted_captions", bool, False, "Captions use attention weights: (word) x1.1, [word] /1.1, (word:1.3); the "
       "text encoder's output of each token is scaled by its weight. No commas inside the brackets when captions are "
       "shuffled or dropped.", "caption", trainers=NOT_TI, family_specific=True),
    _O("flip_aug", bool, False, "Randomly mirror images horizontally.", "dataset"),
    _O("face_crop_aug_range", str, None, "Face-centred crop augmentation (without enable_bucket): 'MIN,MAX' face "
       "size range in units of the crop's short side, e.g. 2.0,4.0. Images are named '<name>_<cx>_<cy>_<w>_<h>' (the "
       "face box in pixels).", "dataset", check=_face_crop_range, advanced=True),
    _O("resize_interpolation", str, None, "Resampling filter when images are resized (default: area to shrink, "
       "lanczos to enlarge).", "dataset", choices=(None, *RESIZE_INTERPOLATIONS), advanced=True),
    _O("alpha_mask", bool, False, "Use each image's alpha channel as the loss mask: transparent pixels are not "
       "trained.", "dataset"),
    _O("masked_loss", bool, False, "Weight the loss by mask images (conditioning_data_dir; white: trained, black: "
       "ignored).", "dataset"),
    _O("conditioning_data_dir", str, None, "Folder of mask images for masked_loss, named like the training images "
       "(a subfolder per concept folder, or all in one).", "folders", path="dir"),
    _O("cache_info", bool, False, "Keep image sizes and captions in metadata_cache.json in each image folder "
       "(faster start with many images).", "dataset", advanced=True),
    _O("debug_dataset", bool, False, "List what the dataset yields (image, bucket, caption, crop) for one epoch "
       "and exit without training.", "dataset", advanced=True),
    _O("color_aug", bool, False, "Random hue shifts (disables latent caching).", "dataset", advanced=True),
    _O("random_crop", bool, False, "Random instead of centred crop (disables latent caching).", "dataset",
       advanced=True),
    _O("cache_latents", bool, False, "Encode every image once with the VAE before training.", "dataset"),
    _O("cache_latents_to_disk", bool, False, "Keep the latent cache in .npz files next to the images.", "dataset"),
    _O("vae_batch_size", int, 1, "Images per VAE batch while caching latents.", "dataset", minimum=1, advanced=True),
    _O("skip_cache_check", bool, False, "Trust existing .npz caches without checking them.", "dataset",
       aliases=("skip_latents_validity_check",),
       advanced=True),
    _O("enable_bucket", bool, False, "Aspect-ratio bucketing: train images at their own aspect ratio.", "bucket"),
    _O("min_bucket_reso", int, 256, "Smallest bucket side.", "bucket", minimum=64),
    _O("max_bucket_reso", int, 1024, "Largest bucket side.", "bucket", minimum=64),
    _O("bucket_reso_steps", int, None, "Bucket sides are multiples of this (default: the family's, 64 for SD 1.x/2.x "
       "and 32 for SDXL).", "bucket", minimum=8),
    _O("bucket_no_upscale", bool, False, "Never upscale images to fill a bucket.", "bucket"),
    _O("prior_loss_weight", float, 1.0, "Loss weight of regularisation images.", "dataset", minimum=0),
    _O("max_data_loader_n_workers", int, 8, "Data loader worker processes (at most the CPU count).", "dataset",
       minimum=0, advanced=True),
    _O("persistent_data_loader_workers", bool, False, "Keep data loader workers between epochs.", "dataset",
       advanced=True),
    # ---- validation (held-out images; dataset TOML keys validation_split / validation_seed win per dataset)
    _O("validation_split", float, 0.0, "Fraction of each dataset's training images held out for the validation "
       "loss (0: no validation).", "dataset", trainers=NET, minimum=0, maximum=1, check=_below_one),
    _O("validation_seed", int, None, "Seed of the validation split and of the validation noise (default: seed).",
       "dataset", trainers=NET, advanced=True),
    _O("validate_every_n_steps", int, None, "Also compute the validation loss every N steps (it is computed at the "
       "end of every epoch anyway, or every validate_every_n_epochs).", "training", trainers=NET, minimum=1,
       check=_positive),
    _O("validate_every_n_epochs", int, None, "Compute the validation loss every N epochs (default: every epoch).",
       "training", trainers=NET, minimum=1, check=_positive),
    _O("max_validation_steps", int, None, "Validation batches per validation (default: all).", "training",
       trainers=NET, minimum=1, check=_positive, advanced=True),
    # ---- network
    _O("network_module", str, "networks.lora", "Adapter type: networks.lora (kohya LoRA / LoCon), networks.loha, "
       "networks.lokr (LoHa / LoKr), networks.dylora (DyLoRA), networks.lora_fa (LoRA-FA), networks.oft / "
       "networks.oft_flux (OFT), lycoris.kohya (LyCORIS: algo= in network_args).", "network",
       trainers=NET, choices=(*_network_module_names(), *_family_option_choices("network_module"))),
    _O("network_dim", int, 4, "LoRA rank.", "network", trainers=NET, minimum=1, check=_positive,
       label="Network rank (dim)"),
    _O("network_alpha", float, 1.0, "LoRA alpha: the update is scaled by alpha / rank.", "network", trainers=NET,
       minimum=0),
    _O("network_dropout", float, None, "Dropout on the LoRA down projection's output (neuron dropout).", "network",
       trainers=NET, minimum=0, maximum=1),
    _O("network_args", str, None, "Extra network options key=value: conv_dim, conv_alpha, rank_dropout, "
       "module_dropout; per U-Net block (SD families): block_dims, block_alphas, conv_block_dims, conv_block_alphas, "
       "down_lr_weight, mid_lr_weight, up_lr_weight (values or sine, cosine, linear, reverse_linear, zeros), "
       "block_lr_zero_threshold; LoRA+: loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio; "
       "networks.lokr: factor, use_tucker; networks.dylora: unit; networks.oft: enable_all_linear, enable_conv; "
       "lycoris.kohya: algo, preset, factor, use_tucker, ...",
       "network", trainers=NET, nargs="*"),
    _O("network_weights", str, None, "Continue training from this LoRA file.", "network", trainers=NET, path="file"),
    _O("dim_from_weights", bool, False, "Take rank and alpha from network_weights.", "network", trainers=NET),
    _O("network_train_unet_only", bool, False, "Train only the U-Net part of the LoRA.", "network", trainers=NET),
    _O("network_train_text_encoder_only", bool, False, "Train only the text-encoder part of the LoRA.", "network",
       trainers=NET),
    _O("network_multiplier", float, 1.0, "Strength of the LoRA while training.", "network", trainers=NET,
       advanced=True),
    _O("base_weights", str, None, "LoRA files merged into the base model before training (the new LoRA learns on "
       "top of them).", "network", trainers=NET, nargs="*", path="file", advanced=True),
    _O("base_weights_multiplier", float, None, "Strength of each base_weights file, in order (default 1.0).",
       "network", trainers=NET, nargs="*", advanced=True),
    _O("scale_weight_norms", float, None, "Max-norm regularisation: after each step, scale every LoRA module whose "
       "update (up x down x alpha/rank) has a larger norm down to this norm (1 is a good start).", "network",
       trainers=NET, minimum=0, check=_positive, advanced=True),
    _O("unet_lr", float, None, "Learning rate of the U-Net LoRA (default: learning_rate).", "optimizer",
       trainers=NET, minimum=0),
    _O("text_encoder_lr", float, None, "Learning rate of the text-encoder LoRA (default: learning_rate); several "
       "values give one per text encoder in order (SDXL: CLIP-L, CLIP-G; SD3: CLIP-L, CLIP-G, T5), the last repeating.",
       "optimizer", trainers=NET, nargs="*", check=_non_negative_list),
    _O("training_comment", str, None, "Stored in the file's metadata (ss_training_comment).", "metadata"),
    # ---- text-encoder output cache (families with FamilySpec.text_encoder_cache)
    _O("cache_text_encoder_outputs", bool, False, "Encode every caption once before training (needs fixed "
       "captions and a frozen text encoder).", "dataset", family_specific=True),
    _O("cache_text_encoder_outputs_to_disk", bool, False, "Keep the text-encoder cache in .npz files next to the "
       "images.", "dataset", family_specific=True, advanced=True),
    _O("no_half_vae", bool, False, "Keep the VAE in float32 under fp16/bf16 (e.g. the SDXL VAE overflows in fp16).",
       "precision"),
    # ---- SD3 / SD3.5 only (names and defaults as sd-scripts' sd3_train_network)
    _O("clip_g", str, None, "CLIP-G text encoder file (when the model file does not include it).", "model",
       path="file", trainers=NET_FT, family_specific=True, label="CLIP-G"),
    _O("apply_lg_attn_mask", bool, False, "Pass the padding mask to CLIP-L and CLIP-G.", "model",
       trainers=NET_FT, family_specific=True),
    _O("clip_l_dropout_rate", float, 0.0, "Probability of training a sample without its CLIP-L embedding.",
       "caption", trainers=NET_FT, family_specific=True, minimum=0, maximum=1),
    _O("clip_g_dropout_rate", float, 0.0, "Probability of training a sample without its CLIP-G embedding.",
       "caption", trainers=NET_FT, family_specific=True, minimum=0, maximum=1),
    _O("t5_dropout_rate", float, 0.0, "Probability of training a sample without its T5-XXL embedding.", "caption",
       trainers=NET_FT, family_specific=True, minimum=0, maximum=1),
    _O("training_shift", float, 1.0, "Shift of the training timestep density (> 1: noisier, overall structure; "
       "< 1: cleaner, detail).", "noise", trainers=NET_FT, family_specific=True, minimum=0, check=_positive),
    _O("pos_emb_random_crop_rate", float, 0.0, "Probability of a random instead of a centred crop of the "
       "positional embedding (SD3.5 medium).", "training", trainers=NET_FT, family_specific=True, minimum=0, maximum=1,
       advanced=True),
    _O("enable_scaled_pos_embed", bool, False, "Scale the positional embedding to each bucket's resolution "
       "(SD3.5 medium, multi-resolution training).", "training", trainers=NET_FT, family_specific=True, advanced=True),
    # ---- DreamBooth / fine-tuning
    _O("learning_rate_te", float, None, "Learning rate of the text encoder (default: learning_rate).", "optimizer",
       trainers=FULL, minimum=0),
    _O("block_lr", str, None, "Learning rate of each U-Net block, comma-separated, 23 values for SDXL (0: the block "
       "is not trained); replaces learning_rate for the U-Net.", "optimizer", trainers=frozenset({"finetune"}),
       family_specific=True, check=_number_list, advanced=True),
    *(_O(f"learning_rate_te{i}", float, None, f"Learning rate of text encoder {i} ({name}; default: "
         "learning_rate_te, else learning_rate); 0 leaves it frozen.", "optimizer", trainers=FULL, minimum=0,
         family_specific=True) for i, name in ((1, "CLIP-L"), (2, "CLIP-G"), (3, "T5-XXL"))),
    _O("train_t5xxl", bool, False, "With train_text_encoder, train T5-XXL too (CLIP-L and CLIP-G otherwise).",
       "training", trainers=frozenset({"finetune"}), family_specific=True),
    _O("use_t5xxl_cache_only", bool, False, "Cache only T5-XXL's outputs while the CLIP encoders are trained.",
       "training", trainers=frozenset({"finetune"}), family_specific=True, advanced=True),
    _O("mem_eff_save", bool, False, "Save full models tensor by tensor (always done here: a save holds about one "
       "tensor beyond the model; accepted for sd-scripts command lines).", "saving", trainers=frozenset({"finetune"}),
       family_specific=True, advanced=True),
    _O("train_text_encoder", bool, False, "Also train the text encoder (fine-tune; DreamBooth trains it unless "
       "stop_text_encoder_training is 0).", "training", trainers=FULL),
    _O("stop_text_encoder_training", int, None, "Stop training the text encoder after this many steps.", "training",
       trainers=frozenset({"db"}), minimum=0),
    _O("num_class_images", int, None, "Generate class images with the base model until each regularisation "
       "folder holds this many.", "dataset", trainers=frozenset({"db"}), minimum=1),
    _O("class_prompt", str, None, "Prompt for generated class images (default: the folder's class tokens).",
       "dataset", trainers=frozenset({"db"})),
    _O("in_json", str, None, "Metadata JSON with captions/tags per image (fine-tuning style dataset; images are "
       "looked up in train_data_dir).", "folders", trainers=CAPTION_JSON, path="file"),
    _O("dataset_repeats", int, 1, "Repeat the in_json dataset this many times per epoch.", "dataset",
       trainers=CAPTION_JSON, minimum=1),
    _O("use_ema", bool, False, "Keep an exponential moving average of the trained weights and save it.", "training",
       trainers=FULL),
    _O("ema_decay", float, 0.9999, "EMA decay per optimizer step.", "training", trainers=FULL, minimum=0, maximum=1),
    _O("fused_backward_pass", bool, False, "Step the optimizer inside the backward pass, one parameter at a time "
       "(less memory for full fine-tuning).", "precision"),
    _O("blockwise_fused_optimizers", bool, False, "sd-scripts' per-block optimizers stepped during backward (FLUX.1 / "
       "SD3 full fine-tuning): here the same as fused_backward_pass, which steps each parameter as soon as its "
       "gradient is ready (at least the same memory saving).", "precision", trainers=FULL, advanced=True),
    # ---- textual inversion
    _O("token_string", str, None, "The new token to train, e.g. 'mychar'.", "training", trainers=frozenset({"ti"})),
    _O("init_word", str, None, "Initialise the new vectors from this word's embedding.", "training",
       trainers=frozenset({"ti"})),
    _O("num_vectors_per_token", int, 1, "Embedding vectors the token stands for.", "training",
       trainers=frozenset({"ti"}), minimum=1),
    _O("weights", str, None, "Continue from this embedding file (ours or an A1111 .pt/.safetensors).", "training",
       trainers=frozenset({"ti"}), path="file"),
    _O("use_object_template", bool, False, "Ignore captions; use object templates ('a photo of a {}').", "caption",
       trainers=frozenset({"ti"})),
    _O("use_style_template", bool, False, "Ignore captions; use style templates ('a painting in the style of {}').",
       "caption", trainers=frozenset({"ti"})),
    # ---- training
    _O("max_train_steps", int, 1600, "Total optimizer steps (max_train_epochs wins if set).", "training",
       minimum=1, check=_positive),
    _O("max_train_epochs", int, None, "Train this many epochs (overrides max_train_steps).", "training",
       minimum=1, check=_positive),
    _O("gradient_accumulation_steps", int, 1, "Batches accumulated per optimizer step.", "training", minimum=1,
       check=_positive),
    _O("seed", int, None, "Random seed (a fixed seed makes runs repeatable).", "training"),
    _O("gradient_checkpointing", bool, False, "Recompute activations in backward to save memory.", "precision"),
    _O("mixed_precision", str, "no", "Compute precision.", "precision", choices=("no", "fp16", "bf16")),
    _O("full_fp16", bool, False, "Keep trained weights in fp16 (saves memory, less stable).", "precision",
       advanced=True),
    _O("full_bf16", bool, False, "Keep trained weights in bf16.", "precision", advanced=True),
    _O("sdpa", bool, False, "Scaled-dot-product attention (always used; accepted for compatibility).", "precision"),
    _O("xformers", bool, False, "Accepted for compatibility: PyTorch SDPA is used instead (same memory saving).",
       "precision", advanced=True),
    _O("mem_eff_attn", bool, False, "Accepted for compatibility: PyTorch SDPA is used instead.", "precision",
       advanced=True),
    _O("lowram", bool, False, "Accepted for compatibility (models load lazily already).", "precision",
       advanced=True),
    _O("max_grad_norm", float, 1.0, "Clip gradients to this norm (0: no clipping).", "training", minimum=0),
    # ---- optimizer
    _O("learning_rate", float, 2e-6, "Base learning rate.", "optimizer", minimum=0),
    _O("optimizer_type", str, "AdamW", "Optimizer: " + ", ".join(_OPTIMIZER_NAMES) + "; or any torch.optim class "
       "name, or module.Class (e.g. pytorch_optimizer.CAME, prodigyplus.ProdigyPlusScheduleFree).", "optimizer",
       check=_optimizer_name, suggestions=(*_OPTIMIZER_NAMES, *_OPTIMIZER_EXAMPLES)),
    _O("optimizer_args", str, None, "Optimizer options key=value (e.g. weight_decay=0.01 betas=0.9,0.99).",
       "optimizer", nargs="*"),
    _O("use_8bit_adam", bool, False, "Same as optimizer_type=AdamW8bit.", "optimizer", advanced=True),
    _O("use_lion_optimizer", bool, False, "Same as optimizer_type=Lion.", "optimizer", advanced=True),
    _O("lr_scheduler", str, "constant", "Learning-rate schedule (adafactor: Adafactor's own step size).", "optimizer",
       choices=_LR_SCHEDULERS),
    _O("lr_warmup_steps", _float_or_int, 0, "Warmup steps, or a fraction of all steps when below 1 (or 'N%').",
       "optimizer", minimum=0),
    _O("lr_decay_steps", _float_or_int, 0, "Decay steps of warmup_stable_decay, or a fraction of all steps when "
       "below 1 (or 'N%').", "optimizer", minimum=0, advanced=True),
    _O("lr_scheduler_num_cycles", int, 1, "Restarts of cosine_with_restarts (half of it: cosine cycles of "
       "cosine_with_min_lr and warmup_stable_decay).", "optimizer", minimum=1),
    _O("lr_scheduler_power", float, 1.0, "Power of the polynomial schedule.", "optimizer"),
    _O("lr_scheduler_timescale", int, None, "Timescale of inverse_sqrt (default: the warmup steps).", "optimizer",
       minimum=1, advanced=True),
    _O("lr_scheduler_min_lr_ratio", float, None, "Lowest learning rate of cosine_with_min_lr / warmup_stable_decay, "
       "as a fraction of the peak.", "optimizer", minimum=0, maximum=1, advanced=True),
    _O("lr_scheduler_type", str, "", "A scheduler class instead of lr_scheduler: a torch.optim.lr_scheduler name "
       "(e.g. CosineAnnealingLR) or module.Class, built with lr_scheduler_args.", "optimizer", advanced=True),
    _O("lr_scheduler_args", str, None, "Scheduler options key=value (e.g. T_max=100, or step_rules for "
       "piecewise_constant).", "optimizer", nargs="*", advanced=True),
    # ---- noise and loss
    _O("noise_offset", float, None, "Add this much per-channel offset noise (brighter/darker images).", "noise",
       minimum=0),
    _O("noise_offset_random_strength", bool, False, "Draw the offset noise's strength from 0 to noise_offset for "
       "each step.", "noise", advanced=True),
    _O("adaptive_noise_scale", float, None, "Add this times the absolute mean of each latent channel to "
       "noise_offset.", "noise", advanced=True, check=_needs_noise_offset),
    _O("multires_noise_iterations", int, None, "Multi-resolution (pyramid) noise with this many levels (6-10 is "
       "typical).", "noise", minimum=0),
    _O("multires_noise_discount", float, 0.3, "Weight of each further multires noise level (discount^level).",
       "noise", minimum=0, advanced=True),
    _O("ip_noise_gamma", float, None, "Input perturbation: add this much extra noise to the denoiser's input only "
       "(0.1 is typical).", "noise", minimum=0),
    _O("ip_noise_gamma_random_strength", bool, False, "Draw the input perturbation's strength from 0 to "
       "ip_noise_gamma for each step.", "noise", advanced=True),
    _O("zero_terminal_snr", bool, False, "Rescale the noise schedule so its last timestep is pure noise (for "
       "v-prediction models).", "noise", advanced=True),
    _O("min_snr_gamma", float, None, "Min-SNR loss weighting gamma (5 is typical).", "noise", minimum=0),
    _O("scale_v_pred_loss_like_noise_pred", bool, False, "Scale a v-prediction model's loss like an epsilon loss "
       "(SNR / (SNR + 1)).", "noise", advanced=True),
    _O("v_pred_like_loss", float, None, "Add this times a v-prediction-like loss (epsilon models).", "noise",
       minimum=0, advanced=True),
    _O("debiased_estimation_loss", bool, False, "Weight the loss by 1 / sqrt(SNR) (v models: 1 / (SNR + 1)).",
       "noise", advanced=True),
    _O("loss_type", str, "l2", "Loss function: l2 (MSE), l1, huber or smooth_l1 (pseudo-Huber with threshold "
       "huber_c).", "noise", choices=("l1", "l2", "huber", "smooth_l1")),
    _O("huber_schedule", str, "snr", "Huber threshold per timestep: constant (huber_c x huber_scale), exponential "
       "(huber_scale down to huber_c x huber_scale) or snr.", "noise", choices=("constant", "exponential", "snr"),
       advanced=True),
    _O("huber_c", float, 0.1, "Huber threshold (decay parameter) of the huber and smooth_l1 losses.", "noise",
       minimum=0, advanced=True),
    _O("huber_scale", float, 1.0, "Scale of the Huber threshold (constant and exponential schedules).", "noise",
       minimum=0, advanced=True),
    _O("min_timestep", int, None, "Lowest timestep sampled.", "noise", minimum=0, maximum=999, advanced=True),
    _O("max_timestep", int, None, "Highest timestep sampled (exclusive).", "noise", minimum=1, maximum=1000,
       advanced=True, check=_timestep_range),
    # ---- flow matching (DiT families)
    _O("guidance_scale", float, 3.5, "Guidance embedding value while training (guidance-distilled models).",
       "noise", trainers=NET_FT, family_specific=True),
    _O("timestep_sampling", str, None, "How sigmas are drawn: sigma (the scheduler's, with weighting_scheme), "
       "uniform, sigmoid, shift, flux_shift, nextdit_shift (default: the model family's, e.g. sigma for FLUX.1).",
       "noise", choices=(None, "sigma", "uniform", "sigmoid", "shift", "flux_shift", "nextdit_shift"), trainers=NET_FT,
       family_specific=True),
    _O("sigmoid_scale", float, 1.0, "Scale of the normal sample in sigmoid/shift/flux_shift sampling.", "noise",
       trainers=NET_FT, family_specific=True),
    _O("model_prediction_type", str, None, "How the prediction is compared: raw, additive (+ noisy input) "
       "or sigma_scaled (x0 estimate, weighted); default: the model family's (e.g. sigma_scaled for FLUX.1).",
       "noise", choices=(None, "raw", "additive", "sigma_scaled"),
       trainers=NET_FT, family_specific=True),
    _O("discrete_flow_shift", float, None, "Shift of the flow-matching schedule (sigma and shift sampling; default: "
       "the model family's, e.g. 3.0 for FLUX.1).", "noise",
       trainers=NET_FT, family_specific=True),
    _O("weighting_scheme", str, "uniform", "Timestep density / loss weighting.", "noise",
       choices=("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform"), trainers=NET_FT,
       family_specific=True),
    _O("logit_mean", float, 0.0, "Mean of logit_normal weighting.", "noise", trainers=NET_FT, family_specific=True,
       advanced=True),
    _O("logit_std", float, 1.0, "Standard deviation of logit_normal weighting.", "noise", trainers=NET_FT,
       family_specific=True, advanced=True),
    _O("mode_scale", float, 1.29, "Scale of mode weighting.", "noise", trainers=NET_FT, family_specific=True,
       advanced=True),
    _O("blocks_to_swap", int, None, "Keep this many denoiser blocks on the CPU, moving each in for its turn.",
       "precision", minimum=0, trainers=NET_FT, family_specific=True),
    _O("fp8_base", bool, False, "Store the frozen base weights in float8 (computed in the mixed precision; LoRA "
       "training).", "precision"),
    _O("fp8_base_unet", bool, False, "Store only the denoiser's base weights in float8.", "precision"),
    _O("fp8_scaled", bool, False, "Store the DiT's frozen base weights in float8 (sd-scripts' scaled fp8; plain "
       "float8 storage here, as fp8_base).", "precision", trainers=NET, family_specific=True),
    _O("fp8_vl", bool, False, "Store the Qwen2.5-VL text encoder's weights in float8 (computed in the mixed "
       "precision).", "precision", trainers=NET, family_specific=True),
    _O("text_encoder_cpu", bool, False, "Run the text encoders on the CPU.", "precision", trainers=NET,
       family_specific=True),
    _O("vae_chunk_size", int, None, "Decode with the VAE in tiles to save memory (sd-scripts: chunked "
       "convolutions; 16 recommended there).", "precision", minimum=1, trainers=NET_FT, family_specific=True,
       advanced=True),
    _O("attn_mode", str, None, "Attention implementation (torch / sdpa: PyTorch SDPA, always used here; xformers, "
       "flash, sageattn fall back to it).", "precision", choices=(None, "torch", "xformers", "flash", "sageattn",
                                                                  "sdpa"),
       trainers=NET_FT, family_specific=True, advanced=True),
    _O("split_attn", bool, False, "Run the denoiser one sample at a time (less attention memory).", "precision",
       trainers=NET_FT, family_specific=True, advanced=True),
    _O("cpu_offload_checkpointing", bool, False, "Offload gradient-checkpointing activations to the CPU.",
       "precision", trainers=NET_FT, family_specific=True),
    # ---- sampling
    _O("sample_prompts", str, None, "Prompt file for sample images (one prompt per line, options after --).",
       "sampling", path="file"),
    _O("sample_every_n_steps", int, None, "Make samples every N steps.", "sampling", minimum=1),
    _O("sample_every_n_epochs", int, None, "Make samples every N epochs.", "sampling", minimum=1),
    _O("sample_at_first", bool, False, "Make samples before the first step.", "sampling"),
    _O("sample_batch_size", int, None, "Accepted for sd-scripts command lines: samples are made one prompt at a time "
       "(the same images).", "sampling", minimum=1, trainers=NET_FT, family_specific=True, advanced=True),
    _O("sample_sampler", str, "ddim", "Sampler for sample images.", "sampling",
       choices=("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
                "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")),
    # ---- saving
    _O("save_model_as", str, "safetensors", "File format of saved models (diffusers folders for full models).",
       "saving", choices=("safetensors", "ckpt", "pt", "diffusers", "diffusers_safetensors"), check=_save_format),
    _O("save_precision", str, None, "Precision of saved weights (default: as trained).", "saving",
       choices=(None, "float", "fp16", "bf16")),
    _O("save_every_n_epochs", int, None, "Save a model every N epochs.", "saving", minimum=1),
    _O("save_every_n_steps", int, None, "Save a model every N steps.", "saving", minimum=1),
    _O("save_last_n_epochs", int, None, "Keep only the last N per-epoch saves.", "saving", minimum=1),
    _O("save_n_epoch_ratio", int, None, "Save about N models over the run: save_every_n_epochs becomes "
       "floor(epochs / N) (at least 1); overrides save_every_n_epochs.", "saving", minimum=1, check=_positive),
    _O("save_last_n_steps", int, None, "Keep only saves from the last N steps.", "saving", minimum=1),
    _O("save_last_n_epochs_state", int, None, "Keep only the last N per-epoch state folders (overrides "
       "save_last_n_epochs for states).", "saving", minimum=1, check=_positive),
    _O("save_last_n_steps_state", int, None, "Keep only state folders from the last N steps (overrides "
       "save_last_n_steps for states).", "saving", minimum=1, check=_positive),
    _O("save_state", bool, False, "Also save optimizer state folders to resume from.", "saving"),
    _O("save_state_on_train_end", bool, False, "Save the state folder at the end of training.", "saving"),
    _O("resume", str, None, "Resume from a saved state folder.", "saving", path="dir"),
    _O("initial_epoch", int, None, "Start counting at this epoch (1 is the first). Without resume the learning-rate "
       "schedule still starts at its beginning.", "saving", trainers=NET, minimum=1, check=_positive, advanced=True),
    _O("initial_step", int, None, "Start counting at this step, all epochs included (0 is the first); overrides "
       "initial_epoch and the step of a resumed state. Without resume the learning-rate schedule still starts at its "
       "beginning.", "saving", trainers=NET, minimum=0, check=_non_negative, advanced=True),
    _O("skip_until_initial_step", bool, False, "Skip the batches before initial_step (or initial_epoch), so the run "
       "sees the data the interrupted run would have seen next.", "saving", trainers=NET, advanced=True),
    _O("no_metadata", bool, False, "Write only the essential metadata into the file.", "metadata"),
    _O("metadata_title", str, None, "modelspec title.", "metadata"),
    _O("metadata_author", str, None, "modelspec author.", "metadata"),
    _O("metadata_description", str, None, "modelspec description.", "metadata"),
    _O("metadata_license", str, None, "modelspec license.", "metadata"),
    _O("metadata_tags", str, None, "modelspec tags (comma separated).", "metadata"),
    _O("metadata_trigger_phrase", str, None, "modelspec trigger_phrase: the words that call up what was trained.",
       "metadata"),
    _O("metadata_usage_hint", str, None, "modelspec usage_hint: a very short hint on how to use the model.",
       "metadata"),
    _O("metadata_thumbnail", str, None, "modelspec thumbnail: an image file (embedded as a data: URL) or a data: "
       "URL.", "metadata", check=_thumbnail, advanced=True),
    _O("metadata_merged_from", str, None, "modelspec merged_from: the models this one was merged from.", "metadata",
       advanced=True),
    _O("metadata_preprocessor", str, None, "modelspec preprocessor: the preprocessing the model expects.",
       "metadata", advanced=True),
    _O("metadata_is_negative_embedding", str, None, "modelspec is_negative_embedding (e.g. True for an embedding "
       "meant for negative prompts).", "metadata", advanced=True),
    # ---- Hugging Face Hub (uploads of saved files; resume from a state folder on the Hub)
    _O("huggingface_repo_id", str, None, "Upload every saved model to this Hub repository, 'user/name' (created "
       "when missing). The local file is always written first.", "hub", check=_hub_repo_id),
    _O("huggingface_repo_type", str, None, "Type of that repository: model (default), dataset or space.", "hub",
       check=_hub_repo_type),
    _O("huggingface_path_in_repo", str, None, "Folder in the repository the files go to (default: its root).",
       "hub"),
    _O("huggingface_token", str, None, "Hub access token with write access. Reaches the trainer as HF_TOKEN; never "
       "written to run files, presets or logs.", "hub", secret=True, env="HF_TOKEN"),
    _O("huggingface_repo_visibility", str, None, "'public' creates the repository public; 'private' (or unset) "
       "private. An existing repository keeps its visibility.", "hub", check=_hub_visibility),
    _O("save_state_to_huggingface", bool, False, "Upload the state folders too (save_state / "
       "save_state_on_train_end).", "hub"),
    _O("resume_from_huggingface", bool, False, "resume names a state folder on the Hub: "
       "'user/repo/path/in/repo[:revision[:repo_type]]'.", "hub"),
    _O("async_upload", bool, False, "Upload in the background while training goes on (the final save is always "
       "waited for).", "hub"),
    # ---- sd-scripts options kept for its command lines: their intent is always met here, or they are refused
    # with the reason when set (`refused`)
    _O("highvram", bool, False, "Accepted for compatibility: device caches are not cleared between steps here.",
       "precision", advanced=True),
    _O("diffusers_xformers", bool, False, "Accepted for compatibility: PyTorch SDPA is used instead.", "precision",
       trainers=frozenset({"finetune"}), advanced=True),
    _O("use_safetensors", bool, False, "Accepted for compatibility: full models are saved as safetensors unless "
       "save_model_as says otherwise.", "saving", trainers=FULL, advanced=True),
    _O("disable_mmap_load_safetensors", bool, False, "Read .safetensors files into memory instead of memory-mapping "
       "them (faster on WSL and network drives).", "model", advanced=True),
    _O("text_encoder_batch_size", int, None, "Captions per batch while caching text-encoder outputs (default 16).",
       "dataset", minimum=1, trainers=NET_FT, family_specific=True, advanced=True),
    _O("num_last_block_to_freeze", int, None, "Keep the denoiser's last N transformer blocks frozen (sd3_train).",
       "training", minimum=1, trainers=frozenset({"finetune"}), family_specific=True, advanced=True),
    _O("fused_optimizer_groups", int, None, "sd-scripts' per-group optimizers stepped during backward: here the "
       "same as fused_backward_pass, which steps each parameter as soon as its gradient is ready.", "precision",
       trainers=FULL, minimum=0, advanced=True),
    _O("no_token_padding", bool, False, "sd-scripts: do not pad captions to the token length.", "caption",
       trainers=frozenset({"db"}), advanced=True,
       refused="captions are always padded to max_token_length, as the text encoders were trained"),
    _O("dataset_class", str, None, "sd-scripts: a custom dataset class.", "folders", advanced=True,
       refused="custom dataset classes are not loaded (no code from options is run); describe the data with "
               "dataset_config"),
    _O("controlnet_model_name_or_path", str, None, "sd-scripts: a FLUX.1 ControlNet.", "model",
       trainers=NET_FT, advanced=True, refused="ControlNet training and conditioning are not implemented"),
    _O("split_mode", bool, False, "sd-scripts (deprecated there): split the FLUX.1 model in two.", "precision",
       trainers=frozenset({"network"}), advanced=True,
       refused="deprecated in sd-scripts and not implemented: use blocks_to_swap to save memory"),
    *(_O(name, int, None, "Deprecated (as in sd-scripts): without blocks_to_swap, blocks_to_swap becomes "
         "double_blocks_to_swap plus half of single_blocks_to_swap.", "precision", trainers=frozenset({"finetune"}),
         minimum=0, family_specific=True, advanced=True)
      for name in ("single_blocks_to_swap", "double_blocks_to_swap")),
    *(_O(name, bool, False, f"sd-scripts (marked as not working there): save {what} into the checkpoint.",
         "saving", trainers=NET_FT, advanced=True,
         refused=f"unified checkpoints are not written (as in sd-scripts); a trained {what} is saved beside the "
                 f"checkpoint as <name>_{file}.safetensors")
      for name, what, file in (("save_clip", "CLIP-L / CLIP-G", "clip_l"), ("save_t5xxl", "T5-XXL", "t5xxl"))),
    _O("t5xxl_device", str, None, "sd-scripts: the device T5-XXL runs on.", "model", trainers=NET_FT, advanced=True,
       refused="T5-XXL runs on the training device; cache_text_encoder_outputs_to_disk frees it during training"),
    _O("t5xxl_dtype", str, None, "sd-scripts: T5-XXL's dtype.", "model", trainers=NET_FT, advanced=True,
       refused="T5-XXL runs in the mixed precision (fp8_base stores it in float8)"),
    # ---- compilation, multi-GPU and DeepSpeed (names and defaults as sd-scripts'; training/accelerator_setup.py)
    _O("torch_compile", bool, False, "Compile the denoiser with torch.compile (the first steps are slow while it "
       "compiles; then faster).", "scaleout"),
    _O("dynamo_backend", str, "inductor", "torch.compile backend (with torch_compile).", "scaleout",
       choices=DYNAMO_BACKENDS, advanced=True),
    _O("ddp_timeout", int, None, "Minutes processes wait for each other before a multi-GPU run fails (default: "
       "accelerate's).", "scaleout", minimum=1, check=_positive, advanced=True),
    _O("ddp_gradient_as_bucket_view", bool, False, "Multi-GPU: gradients are views into the all-reduce buffers "
       "(no copy in and out; less memory).", "scaleout", advanced=True),
    _O("ddp_static_graph", bool, False, "Multi-GPU: the trained parameters are the same every step, so the "
       "all-reduce buffers are laid out once.", "scaleout", advanced=True),
    _O("deepspeed", bool, False, "Train through DeepSpeed ZeRO (needs the deepspeed package and GPUs).", "scaleout"),
    _O("zero_stage", int, 2, "DeepSpeed ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also weights.",
       "scaleout", choices=(0, 1, 2, 3)),
    _O("offload_optimizer_device", str, None, "DeepSpeed: keep optimizer states on the CPU or NVMe (ZeRO 2 and 3).",
       "scaleout", choices=(None, "cpu", "nvme")),
    _O("offload_optimizer_nvme_path", str, None, "DeepSpeed: NVMe folder for offloaded optimizer states (ZeRO 3).",
       "scaleout", path="dir", advanced=True),
    _O("offload_param_device", str, None, "DeepSpeed: keep weights on the CPU or NVMe (ZeRO 3).", "scaleout",
       choices=(None, "cpu", "nvme")),
    _O("offload_param_nvme_path", str, None, "DeepSpeed: NVMe folder for offloaded weights (ZeRO 3).", "scaleout",
       path="dir", advanced=True),
    _O("zero3_init_flag", bool, False, "DeepSpeed: build models already sharded (deepspeed.zero.Init; ZeRO 3). "
       "Refused: the trainers read checkpoints into whole models, ZeRO-3 shards them when training starts.",
       "scaleout", advanced=True),
    _O("zero3_save_16bit_model", bool, False, "DeepSpeed: state folders also get the sharded model's weights "
       "gathered into one 16-bit file (ZeRO 3; model files always hold the full weights).", "scaleout",
       advanced=True),
    _O("fp16_master_weights_and_gradients", bool, False, "DeepSpeed: keep fp16 master weights and gradients (ZeRO 2 "
       "with offload_optimizer_device cpu and fp16).", "scaleout", advanced=True),
    # ---- logging and control (ours)
    _O("events_file", str, None, "Write JSON-lines progress events here (the GUI reads them).", "logging",
       path="out_file", advanced=True),
    _O("control_dir", str, None, "Folder polled for stop/save/sample requests (default: the events file's "
       "folder).", "logging", path="out_dir", advanced=True),
    _O("console_log_level", str, None, "Log level (default INFO).", "logging",
       choices=(None, "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), advanced=True),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
ALIASES: dict[str, str] = {a: o.name for o in OPTIONS for a in o.aliases}


def options_for(trainer: str | None = None, family: str | None = None) -> list[Option]:
    return [o for o in OPTIONS if o.applies_to(trainer, family)]


def defaults(trainer: str | None = None) -> dict[str, Any]:
    return {o.name: o.default for o in options_for(trainer)}


from .errors import UserError  # noqa: E402


class OptionError(UserError, ValueError):
    """A user error in options: the message names the option (and file) and says what to do."""


def _bool_from_text(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of usage + traceback
        raise OptionError(f"{self.prog}: {message} (see --help)")


def build_parser(trainer: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The trainer's argparse parser, generated from the schema."""
    parser = _Parser(prog=prog or f"sd_scripts.{trainer}", allow_abbrev=False,
                     description=f"Train with the {trainer} trainer. Options follow kohya-ss/sd-scripts.")
    parser.add_argument("--config_file", help="TOML file of options (sections are flattened); command-line "
                        "options win over it.")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in options_for(trainer):
        group = groups.setdefault(opt.group, parser.add_argument_group(GROUPS[opt.group]))
        names = [opt.flag] + ["--" + a for a in opt.aliases]
        if opt.type is bool:
            # `--flag` sets True; `--flag false` is accepted too, so GUI-built argv can be explicit.
            group.add_argument(*names, dest=opt.name, nargs="?", const=True, default=None, type=_bool_from_text,
                               help=opt.help.replace("%", "%%"))
            continue
        kwargs: dict[str, Any] = dict(dest=opt.name, default=None, help=opt.help.replace("%", "%%"), type=opt.type)
        if opt.nargs:
            kwargs["nargs"] = opt.nargs
        if opt.choices:
            kwargs["choices"] = [c for c in opt.choices if c is not None]
        group.add_argument(*names, **kwargs)
    return parser


def _flatten_toml(data: dict, source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for k2, v2 in _flatten_toml(value, source).items():
                flat[k2] = v2
        else:
            flat[key] = value
    return flat


def read_toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import toml as tomllib  # type: ignore
    if not os.path.isfile(path):
        raise OptionError(f"config file {path!r} does not exist: check the path given to --config_file")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise OptionError(f"config file {path!r} is not valid TOML: {e}") from None


def _coerce(opt: Option, value: Any, source: str) -> Any:
    if value is None or value == "" and opt.type is not str:
        return None
    try:
        if opt.nargs:
            if isinstance(value, str):
                value = value.split()
            elif not isinstance(value, (list, tuple)):
                value = [value]  # a TOML scalar for a list option (text_encoder_lr = 1e-4)
            return [opt.type(v) if opt.type is not str else str(v) for v in value]
        if opt.type is bool:
            return value if isinstance(value, bool) else _bool_from_text(value)
        if opt.name == "resolution" and isinstance(value, (list, tuple)):
            return ",".join(str(int(v)) for v in value)
        if opt.type in (int, float) and isinstance(value, bool):
            raise ValueError("a number is needed")
        return opt.type(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise OptionError(f"{source}: option '{opt.name}' has value {value!r}: {e}") from None


def config_values(path: str, trainer: str) -> dict[str, Any]:
    """Options from a --config_file TOML: sections flattened; an unknown key is an error naming it."""
    flat = _flatten_toml(read_toml(path), path)
    values: dict[str, Any] = {}
    allowed = {o.name for o in options_for(trainer)}
    for key, value in flat.items():
        name = ALIASES.get(key, key)
        if name not in BY_NAME:
            raise OptionError(f"{path}: unknown option '{key}'. Check its spelling; options the trainer does not "
                              f"support are refused rather than ignored (see --help for the list).")
        if name not in allowed:
            raise OptionError(f"{path}: option '{key}' does not apply to the {trainer} trainer; remove it.")
        values[name] = _coerce(BY_NAME[name], value, path)
    return values


def validate(values: dict[str, Any], trainer: str) -> list[str]:
    """Range, choice and custom checks. Returns messages naming the option; empty when all is well."""
    errors = []
    for opt in options_for(trainer):
        value = values.get(opt.name)
        if value is None:
            continue
        if opt.choices and not opt.nargs and value not in opt.choices:
            errors.append(f"option '{opt.name}': {value!r} is not one of {[c for c in opt.choices if c is not None]}")
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if opt.minimum is not None and value < opt.minimum:
                errors.append(f"option '{opt.name}': {value} is below the minimum {opt.minimum}")
                continue
            if opt.maximum is not None and value > opt.maximum:
                errors.append(f"option '{opt.name}': {value} is above the maximum {opt.maximum}")
                continue
        if opt.refused and value not in (opt.default, False, "", []):
            errors.append(f"option '{opt.name}' is not supported here: {opt.refused}; remove it")
            continue
        if opt.check:
            msg = opt.check(value, values)
            if msg:
                errors.append(f"option '{opt.name}': {msg}")
    if values.get("network_train_unet_only") and values.get("network_train_text_encoder_only"):
        errors.append("options 'network_train_unet_only' and 'network_train_text_encoder_only' exclude each other")
    return errors


def parse_args(trainer: str, argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """Command line (and its --config_file) -> a namespace holding every option of the trainer.

    Precedence: command line > config file > schema default. Raises OptionError with a one-line message.
    """
    parser = build_parser(trainer, prog)
    cli = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    values = defaults(trainer)
    if cli.config_file:
        cli.config_file = config_file_path(cli.config_file)
        if cli.output_config:  # the file is written (training/entry.py), not read
            if os.path.exists(cli.config_file):
                raise OptionError(f"option 'output_config': {cli.config_file!r} already exists; output_config "
                                  "writes a new file: give a --config_file path that does not exist yet")
        else:
            values.update(config_values(cli.config_file, trainer))
    elif cli.output_config:
        raise OptionError("option 'output_config' needs --config_file: the path of the TOML file to write")
    for name, value in vars(cli).items():
        if name != "config_file" and value is not None:
            values[name] = value
    values["output_config"] = bool(cli.output_config)  # as in sd-scripts, only the command line's counts
    errors = validate(values, trainer)
    if errors:
        raise OptionError("; ".join(errors))
    ns = argparse.Namespace(**values)
    ns.config_file = cli.config_file
    return ns


def config_file_path(path: str) -> str:
    """--config_file as sd-scripts reads it: '.toml' is added when the name lacks it."""
    return path if path.endswith(".toml") else path + ".toml"


def to_toml_values(values: dict[str, Any], trainer: str) -> dict[str, dict[str, Any]]:
    """Values -> {group: {name: value}} for a run TOML, leaving out None, schema defaults and secrets (they reach the
    trainer through the environment, see Option.env)."""
    out: dict[str, dict[str, Any]] = {}
    for opt in options_for(trainer):
        value = values.get(opt.name)
        if value is None or value == opt.default or opt.secret:
            continue
        out.setdefault(opt.group, {})[opt.name] = value
    return out


def dump_toml(values: dict[str, Any], trainer: str) -> str:
    """A run TOML that `parse_args(trainer, ['--config_file', path])` reads back to the same values."""
    lines = []
    for group, items in to_toml_values(values, trainer).items():
        lines.append(f"[{group}]")
        for name, value in items.items():
            lines.append(f"{name} = {_toml_literal(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_literal(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def parse_kv_args(items: Iterable[str] | None, option: str) -> dict[str, str]:
    """network_args / optimizer_args 'key=value' items -> dict; a malformed item names the option."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise OptionError(f"option '{option}': {item!r} is not key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out
