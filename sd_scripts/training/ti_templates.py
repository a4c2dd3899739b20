"""Caption templates for textual inversion: `use_object_template` / `use_style_template` replace the captions.

Each template holds one `{}` where the token goes. The object set describes a thing photographed in varied ways; the
style set describes pictures made in a style. Written for this project in the spirit of the prompt lists of the
textual-inversion paper (Gal et al. 2022, https://textual-inversion.github.io/), which sd-scripts and A1111 also use.
"""
from __future__ import annotations

import random
from typing import Sequence

OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a picture of a {}",
    "a close-up photo of the {}",
    "a cropped photo of the {}",
    "a bright photo of a {}",
    "a dark photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a photo of my {}",
    "a photo of a nice {}",
    "a photo of a small {}",
    "a photo of a large {}",
    "a photo of the clean {}",
    "a photo of the dirty {}",
    "a blurry photo of a {}",
    "a sharp photo of the {}",
    "a rendering of a {}",
    "a snapshot of the {}",
    "an image of a {}",
    "a photograph showing the {}",
    "a {} on a plain background",
    "the {} seen from the side",
)

STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}",
    "a picture in the style of {}",
    "an illustration in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a dark painting in the style of {}",
    "a small painting in the style of {}",
    "a large painting in the style of {}",
    "a good painting in the style of {}",
    "a nice picture in the style of {}",
    "a drawing in the style of {}",
    "artwork in the style of {}",
    "a landscape in the style of {}",
    "a portrait in the style of {}",
    "{} style artwork",
)


def templates_for(use_object_template: bool, use_style_template: bool) -> tuple[str, ...] | None:
    """The template set the options ask for, or None to use the dataset's captions."""
    if use_object_template:
        return OBJECT_TEMPLATES
    if use_style_template:
        return STYLE_TEMPLATES
    return None


def fill_templates(templates: Sequence[str], token_text: str, count: int, rng: random.Random) -> list[str]:
    """`count` captions: a random template each, with `token_text` in its `{}`."""
    return [rng.choice(templates).format(token_text) for _ in range(count)]
