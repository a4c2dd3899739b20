"""SD 1.x / SD 2.x: CLIP text conditioning (long captions in 75-token chunks, clip skip) and the U-Net call."""
from __future__ import annotations

from collections import OrderedDict

import torch

CHUNK = 75  # tokens between BOS and EOS in one CLIP window


class SDStrategy:
    """Conditioning for SD 1.x (CLIP-L, pads with EOS) and SD 2.x (OpenCLIP-H, pads with 0)."""

    def __init__(self, bundle, *, clip_skip: int | None = None, max_token_length: int | None = None,
                 memo_size: int = 4096):
        self.family = bundle.family
        self.bundle = bundle
        self.vae_scaling_factor = float(bundle.vae.config.scaling_factor)
        self.clip_skip = clip_skip
        self.max_length = (max_token_length or CHUNK) + 2
        self.pad_id = bundle.tokenizer.pad_token_id
        self.eos_id = bundle.tokenizer.eos_token_id
        # Frozen text encoder: the same caption always encodes the same, so encode it once (the main waste of
        # a naive LoRA step is re-running the text encoder on fixed captions).
        self._memo: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._memo_size = memo_size

    # ---- images
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.bundle.vae
        latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample()
        return latents.float()

    # ---- text
    def tokenize(self, captions: list[str]) -> torch.Tensor:
        ids = self.bundle.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                                    return_tensors="pt").input_ids
        return ids

    def _chunks(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """[B, 2+75n] -> n windows of [B, 77], each BOS + 75 tokens + EOS/pad, as the U-Net was trained on."""
        if ids.shape[1] == CHUNK + 2:
            return [ids]
        bos, last = ids[:, :1], ids[:, -1:]
        chunks = []
        for start in range(1, ids.shape[1] - 1, CHUNK):
            body = ids[:, start:start + CHUNK].clone()
            end = last.clone()
            if self.pad_id != self.eos_id:
                # Pad-with-zero tokenizers: a window whose text ended before it ends with pad, not EOS.
                ended = (body[:, -1] == self.eos_id) | (body[:, -1] == self.pad_id)
                end[ended, 0] = self.pad_id
                end[~ended, 0] = self.eos_id
            else:
                end[:, 0] = self.eos_id
            chunks.append(torch.cat([bos, body, end], dim=1))
        return chunks

    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        te = self.bundle.text_encoder
        outputs = []
        chunks = self._chunks(ids)
        for i, chunk in enumerate(chunks):
            chunk = chunk.to(te.device)
            if self.clip_skip and self.clip_skip > 1:
                out = te(chunk, output_hidden_states=True)
                final_norm = getattr(te, "text_model", te).final_layer_norm  # transformers 4 and 5 layouts
                hidden = final_norm(out.hidden_states[-self.clip_skip])
            else:
                hidden = te(chunk)[0]
            if len(chunks) > 1:  # keep BOS of the first window and EOS of the last one only
                hidden = hidden[:, (0 if i == 0 else 1):(hidden.shape[1] if i == len(chunks) - 1 else -1)]
            outputs.append(hidden)
        return torch.cat(outputs, dim=1)

    def encode_captions(self, captions: list[str], *, train_text_encoder: bool) -> torch.Tensor:
        if self.bundle.text_encoder is None:  # released: every caption was encoded beforehand
            return torch.stack([self._memo[c] for c in captions])
        if train_text_encoder:
            return self._encode_ids(self.tokenize(captions))
        missing = list(dict.fromkeys(c for c in captions if c not in self._memo))
        if missing:
            with torch.no_grad():
                encoded = self._encode_ids(self.tokenize(missing))
            for caption, states in zip(missing, encoded):
                self._memo[caption] = states
                if len(self._memo) > self._memo_size:
                    self._memo.popitem(last=False)
        for c in captions:
            self._memo.move_to_end(c)
        return torch.stack([self._memo[c] for c in captions])

    def release_text_encoders(self, captions: list[str], max_captions: int = 1024) -> bool:
        """Encode every caption the run can draw, then drop the frozen text encoder (saves its memory)."""
        if len(captions) > max_captions:
            return False
        with torch.no_grad():
            for start in range(0, len(captions), 16):
                chunk = captions[start:start + 16]
                for caption, states in zip(chunk, self._encode_ids(self.tokenize(chunk))):
                    self._memo[caption] = states
        self._memo_size = max(self._memo_size, len(self._memo))
        self.bundle.text_encoder = None
        return True

    # ---- U-Net
    def predict(self, noisy_latents, timesteps, conditioning, batch) -> torch.Tensor:
        return self.bundle.unet(noisy_latents, timesteps, conditioning, return_dict=False)[0]
