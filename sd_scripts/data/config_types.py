"""The typed dataset description: one DatasetConfig (shared resolution, buckets, batch size) of SubsetConfigs
(one image folder each). Built by `dataset_config.load_datasets` and `folders.scan_concept_folders`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .captions import CaptionOptions


@dataclass
class SubsetConfig:
    """One folder of images and how its images and captions are used."""

    image_dir: str | None
    num_repeats: int = 1
    class_tokens: str | None = None
    is_reg: bool = False
    caption_extension: str = ".caption"
    caption: CaptionOptions = field(default_factory=CaptionOptions)
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    alpha_mask: bool = False  # the image's alpha channel is its loss mask
    conditioning_data_dir: str | None = None  # mask images named like the images (masked_loss)
    face_crop_aug_range: tuple[float, float] | None = None
    cache_info: bool = False
    custom_attributes: dict[str, Any] = field(default_factory=dict)
    resize_interpolation: str | None = None
    metadata_file: str | None = None  # fine-tune JSON {image: {"caption"|"tags": ...}}

    @property
    def has_mask(self) -> bool:
        """Its images come with a loss mask (alpha channel or mask image)."""
        return self.alpha_mask or self.conditioning_data_dir is not None

    @property
    def fallback_caption(self) -> str:
        """The caption of an image without a caption file."""
        return self.class_tokens or ""


@dataclass
class DatasetConfig:
    """Images that share a resolution, bucket settings and batch size."""

    resolution: tuple[int, int] = (512, 512)  # (w, h)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_split: float = 0.0
    validation_seed: int | None = None
    resize_interpolation: str | None = None
    subsets: list[SubsetConfig] = field(default_factory=list)
    source: str | None = None  # the dataset TOML it came from (None: the command-line folders)
