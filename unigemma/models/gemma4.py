"""Gemma 4 unified: the text decoder plus the encoder-free image and audio embedders.

`Gemma4Unified.logits(...)` takes exactly the tensors the reference processor produces and
returns logits `[B, S, vocab]`; `forward(...)` is the cached step the generators use. The
module tree mirrors transformers' (`model.language_model`, `model.embed_vision`,
`model.embed_audio`) so loading is close to the identity; `checkpoint_name_to_module`
holds every rename between the on-disk names and this tree.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache.kv import KVCache
from ..config import FULL, SLIDING, ModelConfig
from ..embed.audio import MultimodalEmbedder, embed_audio
from ..embed.merge import scatter_features
from ..embed.vision import VisionEmbedder, embed_patches
from ..errors import InputError
from .layers import softcap
from .masks import COMPOSITIONS, block_ids, make_mask
from .text import TextModel


class _Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        t = config.text
        self.language_model = TextModel(t)
        self.embed_vision = VisionEmbedder(config.vision, t.hidden_size) if config.vision else None
        self.embed_audio = (MultimodalEmbedder(config.audio.audio_embed_dim, t.hidden_size, config.audio.rms_norm_eps)
                            if config.audio else None)


def checkpoint_name_to_module(name: str, config: ModelConfig) -> str | None:
    """On-disk tensor name → parameter name in this module tree (None: not stored by us)."""
    if name == "lm_head.weight" and config.text.tie_word_embeddings:
        return None  # tied to the embedding; some writers store the copy anyway
    if config.model_type == "gemma4_unified_text" and name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    if name == "model.embed_vision.embedding_projection.weight":
        return "model.embed_vision.multimodal_embedder.embedding_projection.weight"
    if name.startswith("model.vision_embedder."):
        return "model.embed_vision." + name[len("model.vision_embedder."):]
    return name


class Gemma4Unified(nn.Module):
    def __init__(self, config: ModelConfig, block_mask: str = "sliding"):
        super().__init__()
        if block_mask not in COMPOSITIONS:
            raise ValueError(f"block_mask must be one of {COMPOSITIONS}, got {block_mask!r}")
        self.config = config
        self.block_mask = block_mask
        self.model = _Backbone(config)
        if not config.text.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.packed_head = None  # models/packed.py: the head weight prepacked for fast decoding

    @property
    def text(self) -> TextModel:
        return self.model.language_model

    @property
    def dtype(self) -> torch.dtype:
        return self.text.norm.weight.dtype  # a float weight even when the matrices are quantized

    @property
    def device(self) -> torch.device:
        return self.text.norm.weight.device

    def make_cache(self, batch: int, max_len: int, reserve: int = 16) -> KVCache:
        return KVCache(self.config.text, batch, max_len, self.dtype, self.device, reserve)

    # -- inputs → embeddings -----------------------------------------------------------
    def embed(self, input_ids, pixel_values=None, image_position_ids=None, input_features=None,
              input_features_mask=None, pixel_values_videos=None, video_position_ids=None,
              require_media: bool = True) -> torch.Tensor:
        """Token ids [B, S] plus media → input embeddings [B, S, hidden] with soft tokens in place.

        require_media: a prompt's placeholders must come with their media. Generated tokens
        may be placeholder ids (the model can emit them); those embed as the pad row, as in
        the reference.
        """
        c = self.config
        kinds = [("image", c.image_token_id, pixel_values), ("video", c.video_token_id, pixel_values_videos),
                 ("audio", c.audio_token_id, input_features)]
        slots = {kind: input_ids == tok for kind, tok, _ in kinds}
        placeholder = slots["image"] | slots["video"] | slots["audio"]
        # placeholder rows are overwritten; look up the pad row only to stay in range
        h = self.text.embed(torch.where(placeholder, c.text.pad_token_id, input_ids))
        for kind, _, media in kinds:
            if media is None:
                if require_media and bool(slots[kind].any()):
                    raise InputError(f"the prompt has {int(slots[kind].sum())} {kind} placeholder tokens "
                                     f"but no {kind} inputs were given")
                continue
            h = scatter_features(h, slots[kind], self._media_features(kind, media, image_position_ids,
                                                                      video_position_ids, input_features_mask), kind)
        return h

    def _media_features(self, kind, media, image_position_ids, video_position_ids, input_features_mask):
        if kind == "audio":
            if self.model.embed_audio is None:
                raise InputError("audio inputs given, but this checkpoint has no audio embedder")
            if media.ndim != 3 or media.shape[-1] != self.config.audio.audio_embed_dim:
                raise InputError(f"input_features must be [num_audios, frames, {self.config.audio.audio_embed_dim}], "
                                 f"got {tuple(media.shape)}")
            mask = input_features_mask
            if mask is None:  # the reference crashes here; every frame is real by default
                mask = torch.ones(media.shape[:2], dtype=torch.bool, device=media.device)
            if mask.shape != media.shape[:2]:
                raise InputError(f"input_features_mask {tuple(mask.shape)} does not match input_features "
                                 f"{tuple(media.shape[:2])}")
            return embed_audio(self.model.embed_audio, media.to(self.device), mask.to(self.device))
        if self.model.embed_vision is None:
            raise InputError(f"{kind} inputs given, but this checkpoint has no vision embedder")
        pos = image_position_ids if kind == "image" else video_position_ids
        name = "image_position_ids" if kind == "image" else "video_position_ids"
        if pos is None:
            raise InputError(f"{kind} pixel values given without {name}")
        if media.shape[-1] != self.config.vision.patch_dim or pos.shape[-1] != 2 or media.shape[:-1] != pos.shape[:-1]:
            raise InputError(f"{kind} pixel values {tuple(media.shape)} / {name} {tuple(pos.shape)}: expected "
                             f"[..., patches, {self.config.vision.patch_dim}] and [..., patches, 2]")
        return embed_patches(self.model.embed_vision, media.to(self.device), pos.to(self.device))

    # -- masks -------------------------------------------------------------------------
    def _masks(self, q_idx, k_idx: dict, k_valid: dict, mm_token_type_ids, block_mask) -> dict:
        t = self.config.text
        q_block = None
        if mm_token_type_ids is not None and t.use_bidirectional_attention == "vision":
            q_block = block_ids(mm_token_type_ids.to(q_idx.device))
        masks = {}
        for lt in set(t.layer_types):
            ki = k_idx[lt]
            k_block = None
            if q_block is not None:  # only keys of this step can share a block with its queries
                rel = ki - q_idx[0]
                inside = (rel >= 0) & (rel < q_idx.shape[0])
                k_block = torch.where(inside, q_block[:, rel.clamp(0, q_idx.shape[0] - 1)], -1)
            window = t.sliding_window if lt == SLIDING else None
            masks[lt] = make_mask(q_idx, ki, k_valid[lt], q_block, k_block, window, block_mask)
        return masks

    # -- forward -----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, *, attention_mask=None,
                mm_token_type_ids=None, cache: KVCache | None = None, block_mask: str | None = None,
                require_media: bool = True, embeds: torch.Tensor | None = None, **media) -> torch.Tensor:
        """One forward over new tokens. Returns the final normed hidden states [B, S, hidden].

        positions [B, S]: RoPE positions. attention_mask [B, S] (new tokens only when a cache is
        given): 0 marks left padding. With a cache the new tokens are appended to it.
        embeds: precomputed input embeddings of these tokens (`embed`), e.g. a slice of a
        prompt embedded once and prefilled in chunks; media are then not needed.
        """
        block_mask = block_mask or self.block_mask
        h = embeds if embeds is not None else self.embed(input_ids, require_media=require_media, **media)
        B, S = input_ids.shape
        valid = (torch.ones(B, S, dtype=torch.bool, device=h.device) if attention_mask is None
                 else attention_mask.to(h.device).bool())
        if cache is None:
            idx = torch.arange(S, device=h.device)
            kv_valid = None if attention_mask is None else valid
            masks = self._masks(idx, {SLIDING: idx, FULL: idx}, {SLIDING: kv_valid, FULL: kv_valid},
                                mm_token_type_ids, block_mask)
            return self.text(h, positions.to(h.device), masks)
        steps = cache.begin(valid)
        idx = cache.query_index(S)  # [S], or [B, S] when each row is its own sequence
        if idx.dim() == 2 and mm_token_type_ids is not None:
            raise ValueError("media tokens are prefilled one sequence at a time, not in a decode batch")
        masks = self._masks(idx, {t: s.k_idx for t, s in steps.items()}, {t: s.k_valid for t, s in steps.items()},
                            mm_token_type_ids, block_mask)
        try:
            out = self.text(h, positions.to(h.device), masks, cache)
        except BaseException:
            cache.abort()
            raise
        cache.end()
        return out

    def head_weight(self) -> torch.Tensor | None:
        """The LM head's float weight (None when it is quantized)."""
        w = getattr(self.text.embed_tokens if self.config.text.tie_word_embeddings else self.lm_head, "weight", None)
        return w if isinstance(w, torch.Tensor) and w.is_floating_point() else None

    def head(self, h: torch.Tensor) -> torch.Tensor:
        if self.packed_head is not None:
            return softcap(self.packed_head(h), self.config.text.final_logit_softcapping)
        return self.text.head(h, None if self.config.text.tie_word_embeddings else self.lm_head)

    @torch.inference_mode()
    def logits(self, input_ids, attention_mask=None, mm_token_type_ids=None, pixel_values=None,
               image_position_ids=None, input_features=None, input_features_mask=None,
               pixel_values_videos=None, video_position_ids=None, *, block_mask: str | None = None) -> torch.Tensor:
        """The reference forward: processor tensors → logits [B, S, vocab] (model dtype).

        Positions are 0..S-1 as in transformers' plain forward (RoPE is relative, so left
        padding does not change the logits of real tokens beyond rounding).
        """
        input_ids = _check_ids(input_ids, self.config.text.vocab_size)
        B, S = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (B, S):
            raise InputError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {(B, S)}")
        if mm_token_type_ids is not None and tuple(mm_token_type_ids.shape) != (B, S):
            raise InputError(f"mm_token_type_ids {tuple(mm_token_type_ids.shape)} does not match input_ids {(B, S)}")
        positions = torch.arange(S, device=self.device).expand(B, S)
        h = self.forward(input_ids.to(self.device), positions, attention_mask=attention_mask,
                         mm_token_type_ids=mm_token_type_ids, block_mask=block_mask, pixel_values=pixel_values,
                         image_position_ids=image_position_ids, input_features=input_features,
                         input_features_mask=input_features_mask, pixel_values_videos=pixel_values_videos,
                         video_position_ids=video_position_ids)
        return self.head(h)


def _check_ids(input_ids, vocab_size: int) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.ndim != 2 or input_ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise InputError(f"input_ids must be integer token ids [batch, seq], got {input_ids.dtype} {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise InputError("input_ids is empty")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise InputError(f"input_ids hold token id {lo if lo < 0 else hi}, outside the vocabulary of {vocab_size}")
    return input_ids.long()
