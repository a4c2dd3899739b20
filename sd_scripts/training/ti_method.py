"""Textual inversion: learn the embedding vectors of a new token; the U-Net and the text encoder stay frozen.

For each text encoder of the family (SD1/SD2: one, key 'emb_params'; SDXL: 'clip_l' and 'clip_g') the method
1. adds `token_string` (and `token_string1` ... for `num_vectors_per_token` > 1) to the tokenizer,
2. resizes the encoder's token-embedding table and fills the new rows from `init_word` (its token vectors repeated
   over the new ones), from the vocabulary mean without an init word, or from a `weights` embedding file,
3. trains ONLY those rows: a small [n_vectors, dim] parameter that a forward hook on the token-embedding module
   substitutes at the new token ids. The table itself stays frozen, so the optimizer state is n_vectors x dim instead
   of the whole 49408 x 768 table, and no frozen row can move (benchmarks/ti_trainable_rows.py: about 7x less time
   per update than training the whole table and restoring the old rows, 12,000x less optimizer memory). After each
   optimizer step the rows are also written into the table, so the bundle's text encoder is always current.

Captions must contain `token_string` (a missing one is put in front, with one warning); with `use_object_template` /
`use_style_template` they are replaced by templates. In captions and sample prompts the token expands to all its
vectors' tokens. Saves FORMATS.md's embedding file with only modelspec metadata.
"""
from __future__ import annotations

import argparse
import logging
import random
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..options import OptionError
from .methods import TrainingMethod

log = logging.getLogger("sd_scripts.train")

#: modelspec.architecture suffix of embeddings (FORMATS.md, 'LoRA file').
MODELSPEC_ADAPTER = "textual-inversion"


@dataclass
class EncoderSlot:
    """One text encoder the embedding lives in: its key in the file, its tokenizer and its model."""

    key: str
    tokenizer: Any
    text_encoder: Any


def encoder_slots(bundle, family: str) -> list[EncoderSlot]:
    """The (key, tokenizer, text encoder) triples of a family: one per text encoder, keyed as its embedding files
    key them (FamilySpec.ti_keys, e.g. 'emb_params', or 'clip_l' and 'clip_g')."""
    from ..families import family_spec

    keys = family_spec(family).ti_keys
    parts = list(zip(bundle.tokenizers, bundle.text_encoders))
    if len(parts) < len(keys) or any(p is None for pair in parts[:len(keys)] for p in pair):
        raise NotImplementedError(f"textual inversion needs every text encoder and tokenizer of the model "
                                  f"({len(keys)})")
    return [EncoderSlot(key, tokenizer, encoder) for key, (tokenizer, encoder) in zip(keys, parts)]


def token_names(token_string: str, num_vectors: int) -> list[str]:
    """'mychar', 3 -> ['mychar', 'mychar1', 'mychar2']: the tokens one caption word stands for (sd-scripts naming)."""
    return [token_string] + [f"{token_string}{i}" for i in range(1, num_vectors)]


def check_new_token(tokenizer, name: str) -> None:
    """OptionError when `name` is already in the vocabulary (as an entry, an added token or one whole word)."""
    if name in tokenizer.get_vocab() or len(tokenizer(name, add_special_tokens=False).input_ids) == 1:
        raise OptionError(f"option 'token_string': {name!r} is already a token of the tokenizer's vocabulary, so "
                          f"training it would change an existing word; choose a new word such as "
                          f"'{name}_emb' or 'my{name}'")


def init_token_ids(tokenizer, init_word: str, num_vectors: int) -> list[int]:
    """The ids whose embeddings initialise the new vectors, repeated over all of them; OptionError when the word
    needs more tokens than there are vectors."""
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise OptionError(f"option 'init_word': {init_word!r} gives no tokens; give a word such as 'woman' or 'style'")
    if len(ids) > num_vectors:
        raise OptionError(f"option 'init_word': {init_word!r} is {len(ids)} tokens but num_vectors_per_token is "
                          f"{num_vectors}; use a one-token word or set num_vectors_per_token to at least {len(ids)}")
    return [ids[i % len(ids)] for i in range(num_vectors)]


class NewTokenRows:
    """Forward hook for a token-embedding module: rows of ids [first_id, first_id + n) come from `vectors`.

    Always substitutes (no `.any()` test), so a forward pass never waits for the device."""

    def __init__(self, vectors: torch.nn.Parameter, first_id: int):
        self.vectors = vectors
        self.first_id = first_id

    def __call__(self, _module, inputs, output: torch.Tensor) -> torch.Tensor:
        index = inputs[0] - self.first_id
        is_new = (index >= 0) & (index < self.vectors.shape[0])
        rows = self.vectors.to(output.dtype)[index.clamp(0, self.vectors.shape[0] - 1)]
        return torch.where(is_new.unsqueeze(-1), rows, output)


class TextualInversionMethod(TrainingMethod):
    """Textual inversion (train_textual_inversion): the new token's vectors are the only trained weights."""

    name = "ti"
    not_shardable = ("textual inversion trains a few embedding vectors that a hook puts into a frozen table: "
                     "nothing worth sharding; use data parallel ('accelerate launch --multi_gpu')")

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        a = args
        if not a.token_string or not a.token_string.strip():
            raise OptionError("option 'token_string' is required: the new word to train, e.g. 'mychar'")
        if re.search(r"\s", a.token_string):
            raise OptionError(f"option 'token_string': {a.token_string!r} must be one word without spaces")
        if a.use_object_template and a.use_style_template:
            raise OptionError("options 'use_object_template' and 'use_style_template' exclude each other; "
                              "choose one")
        if a.save_model_as not in ("safetensors", "pt", "ckpt"):
            raise OptionError(f"option 'save_model_as': an embedding is saved as safetensors or pt (A1111), not "
                              f"{a.save_model_as!r}")
        from .ti_templates import templates_for

        self.tokens = token_names(a.token_string, a.num_vectors_per_token)
        self.token_text = " ".join(self.tokens)  # what the caption word becomes
        self.templates = templates_for(a.use_object_template, a.use_style_template)
        self._pattern = re.compile(r"(?<![\w])" + re.escape(a.token_string) + r"(?![\w])", re.IGNORECASE)
        self._rng = random.Random(a.seed)
        self._warned_missing = False
        self.vectors = torch.nn.ParameterDict()
        self.rows: dict[str, tuple[torch.nn.Module, list[int]]] = {}  # key -> (embedding module, new ids)
        self.family = ""
        self.v_prediction = False

    @property
    def trains_text_encoder(self) -> bool:
        """The text encoder runs with gradients (to reach the new rows), though none of its weights train."""
        return True

    # ---- set-up
    def build(self, bundle, *, family: str) -> tuple[list[dict], list[str]]:
        """Adds the tokens to every text encoder of the family and returns the vectors as the one param group."""
        a = self.args
        self.family, self.v_prediction = family, bool(bundle.v_prediction)
        for part in (bundle.denoiser, bundle.vae, *(s.text_encoder for s in encoder_slots(bundle, family))):
            part.requires_grad_(False)
        source = None
        if a.weights:
            from ..networks.embeddings import load_embedding

            source = load_embedding(a.weights)
            if a.init_word:
                log.info("init_word %r is not used: the vectors start from %s", a.init_word, a.weights)
        for slot in encoder_slots(bundle, family):
            self.vectors[slot.key] = self._add_tokens(slot, source)
        return [{"params": list(self.vectors.values()), "lr": a.learning_rate}], ["textencoder"]

    def _add_tokens(self, slot: EncoderSlot, source) -> torch.nn.Parameter:
        a, n = self.args, self.args.num_vectors_per_token
        tokenizer, encoder = slot.tokenizer, slot.text_encoder
        for name in self.tokens:
            check_new_token(tokenizer, name)
        init_ids = init_token_ids(tokenizer, a.init_word, n) if a.init_word and source is None else None
        embedding = encoder.get_input_embeddings()
        old_rows = embedding.weight.shape[0]
        tokenizer.add_tokens(self.tokens)
        new_ids = tokenizer.convert_tokens_to_ids(self.tokens)
        if new_ids != list(range(new_ids[0], new_ids[0] + n)):
            raise RuntimeError(f"the tokenizer gave the new tokens non-consecutive ids {new_ids}")
        if len(tokenizer) > old_rows:
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            embedding = encoder.get_input_embeddings()
        table = embedding.weight
        with torch.no_grad():
            if source is not None:
                start = self._vectors_from_file(source, slot.key, table.shape[1])
            elif init_ids is not None:
                start = table[init_ids].float()
            else:
                log.info("no init_word: the new vectors start at the mean of the vocabulary's embeddings")
                start = table[:old_rows].float().mean(dim=0, keepdim=True).repeat(n, 1)
            table[new_ids] = start.to(table.dtype)
        embedding.weight.requires_grad_(False)
        vectors = torch.nn.Parameter(start.clone().to(table.device, torch.float32))
        embedding.register_forward_hook(NewTokenRows(vectors, new_ids[0]))
        self.rows[slot.key] = (embedding, new_ids)
        log.info("token %r -> ids %s in text encoder %r", a.token_string, new_ids, slot.key)
        return vectors

    def _vectors_from_file(self, source, key: str, dim: int) -> torch.Tensor:
        a = self.args
        start = source.vectors_for(key, a.weights)
        if start.shape[1] != dim:
            raise OptionError(f"option 'weights': {a.weights!r} holds vectors of size {start.shape[1]} but this "
                              f"model's text encoder uses {dim}: the embedding was made for another model family")
        if start.shape[0] != a.num_vectors_per_token:
            raise OptionError(f"option 'weights': {a.weights!r} holds {start.shape[0]} vectors per token; set "
                              f"num_vectors_per_token to {start.shape[0]}")
        return start

    def trainable_module(self) -> torch.nn.Module:
        return self.vectors

    # ---- per step
    def captions(self, captions: list[str]) -> list[str]:
        """Templates (with the token) or the dataset's captions with the token expanded to all its vectors."""
        if self.templates:
            from .ti_templates import fill_templates

            return fill_templates(self.templates, self.token_text, len(captions), self._rng)
        return [self._caption_with_token(c) for c in captions]

    def _caption_with_token(self, caption: str) -> str:
        if not caption.strip():  # caption dropout: train the unconditional case as it is
            return caption
        if not self._pattern.search(caption):
            if not self._warned_missing:
                self._warned_missing = True
                self.warn(f"caption {caption[:80]!r} does not contain token_string {self.args.token_string!r}: "
                          f"the token is put in front of such captions",
                          hint="write the token into the captions, or use use_object_template / use_style_template")
            caption = f"{self.args.token_string}, {caption}"
        return self.expand(caption)

    def expand(self, text: str) -> str:
        """Every whole-word token_string in `text` -> all the token's vector tokens ('mychar mychar1 mychar2')."""
        if len(self.tokens) == 1 or not text:
            return text
        return self._pattern.sub(lambda _m: self.token_text, text)

    def sample_prompts(self, prompts: list) -> list:
        """Sample prompts use the token as captions do."""
        from dataclasses import replace

        return [replace(p, prompt=self.expand(p.prompt), negative_prompt=self.expand(p.negative_prompt))
                for p in prompts]

    def after_optimizer_step(self, step: int) -> None:
        """Keep the text encoder's table in step with the trained vectors (a few rows, cheap)."""
        with torch.no_grad():
            for key, (embedding, new_ids) in self.rows.items():
                embedding.weight[new_ids] = self.vectors[key].to(embedding.weight.dtype)

    # ---- outputs
    def file_extension(self) -> str:
        return "." + self.args.save_model_as

    def metadata(self, training_metadata: dict[str, str]) -> dict[str, str]:
        """Only modelspec.* (as sd-scripts writes embeddings), architecture '<family>/textual-inversion', title the
        token (unless metadata_title is given)."""
        from .metadata import modelspec_architecture

        meta = {k: v for k, v in training_metadata.items() if k.startswith("modelspec.")}
        meta["modelspec.architecture"] = modelspec_architecture(self.family, self.v_prediction, MODELSPEC_ADAPTER)
        meta["modelspec.title"] = self.args.metadata_title or self.args.token_string
        # Not metadata of the file, but what the A1111 .pt layout records.
        self._step = training_metadata.get("ss_steps")
        self._sd_model_name = training_metadata.get("ss_sd_model_name")
        return meta

    def save(self, module: torch.nn.Module, path: str, *, dtype: torch.dtype | None, metadata: dict[str, str]):
        from ..networks.embeddings import save_embedding

        step = getattr(self, "_step", None)
        save_embedding(path, {k: v.detach().float() for k, v in module.items()}, name=self.args.token_string,
                       metadata=metadata, step=int(step) if step and step.isdigit() else None,
                       sd_checkpoint_name=getattr(self, "_sd_model_name", None), dtype=dtype)
