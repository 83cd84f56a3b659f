"""PyramidDrop for transformers' ``LlavaForConditionalGeneration`` (5.x): image tokens dropped inside the LLM.

At each configured layer ``l`` (the start of a new stage), during prefill: the image tokens are ranked by the
attention the last instruction token (the last attended prompt token) pays them in layer ``l``'s own attention
(its input norm, q/k projections and rotary embedding, heads averaged), the top ``round(keep_ratio * n)`` are
kept in their original order and the rest are dropped from the hidden states, position ids (kept tokens keep
their original positions), attention mask and, for training, labels. Layers before the first stage see the full
sequence. Decoding reuses each layer's own (shorter) KV cache with that layer's key mask, so generate() works.

Image tokens are found from ``input_ids == config.image_token_id``; several images in one sample are ranked
together (their tokens form one pool). Every sample of a batch must hold the same number of image tokens, so the
kept lengths agree. Works with encoder-side ``keep_tokens`` (fewer image tokens to start from).

    drop = PyramidDrop(model, layers=(8, 16, 24), keep_ratio=0.5)   # opt-in; drop.remove() restores the model
"""
from __future__ import annotations

import functools
import types
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["PyramidDrop"]


def _rotary_helpers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    return apply_rotary_pos_emb, repeat_kv


def _additive_mask(key_valid: torch.Tensor, num_queries: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, q, k) additive mask: key j visible to query i if valid and causal (queries are the last q keys)."""
    b, k = key_valid.shape
    q_pos = torch.arange(k - num_queries, k, device=key_valid.device)[:, None]
    allowed = (torch.arange(k, device=key_valid.device)[None, :] <= q_pos)[None] & key_valid[:, None, :]
    mask = torch.zeros(b, 1, num_queries, k, dtype=dtype, device=key_valid.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class PyramidDrop:
    """Opt-in PyramidDrop on a ``LlavaForConditionalGeneration``; see the module docstring.

    Attributes after a prefill: ``kept_positions`` (B, L') original indices of the tokens after the last stage,
    ``stage_lengths`` the sequence length each layer ran at.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] = (8, 16, 24), keep_ratio: float = 0.5):
        lm = model.model.language_model
        n = len(lm.layers)
        layers = sorted(int(i) for i in layers)
        if not layers or layers[0] < 1 or layers[-1] >= n or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct stage starts in 1..{n - 1} for a {n}-layer LLM, got {layers}")
        if not 0.0 < float(keep_ratio) <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.model, self.lm, self.layers, self.keep_ratio = model, lm, layers, float(keep_ratio)
        self.image_token_id = getattr(model.config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = model.config.image_token_index
        self.kept_positions: Optional[torch.Tensor] = None
        self.stage_lengths: List[int] = []
        self._image_mask: Optional[torch.Tensor] = None
        self._layer_keys: Dict[int, List[torch.Tensor]] = {}  # id(cache) -> per-layer key validity
        self._hook = model.model.register_forward_pre_hook(self._capture_ids, with_kwargs=True)
        self._orig_lm_forward = lm.forward
        self._orig_forward = model.forward
        lm.forward = types.MethodType(_lm_forward_with(self), lm)
        # generate() validates its kwargs against the forward signature: keep the model's own
        @functools.wraps(self._orig_forward)
        def forward(*args: Any, **kwargs: Any):
            return self._forward_with_labels(*args, **kwargs)

        model.forward = forward

    def remove(self) -> None:
        """Restores the model's own forward passes."""
        self._hook.remove()
        self.lm.forward = self._orig_lm_forward
        self.model.forward = self._orig_forward

    def kept_count(self, num_image_tokens: int) -> int:
        return max(1, int(round(self.keep_ratio * num_image_tokens)))

    # --- hooks --------------------------------------------------------------------------------------------
    def _capture_ids(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._image_mask = None if input_ids is None else input_ids == self.image_token_id

    def _forward_with_labels(self, *args: Any, labels: Optional[torch.Tensor] = None, **kwargs: Any):
        out = self._orig_forward(*args, **kwargs)
        if labels is not None:
            kept = self.kept_positions.to(labels.device)
            out.loss = self.model.loss_function(logits=out.logits, labels=labels.gather(1, kept),
                                                vocab_size=self.model.config.text_config.vocab_size)
        return out

    # --- the rule -----------------------------------------------------------------------------------------
    def image_scores(self, layer: nn.Module, h: torch.Tensor, position_ids: torch.Tensor,
                     key_valid: torch.Tensor) -> torch.Tensor:
        """(B, L) heads-averaged attention of each sample's last valid token over the sequence, in ``layer``."""
        apply_rotary_pos_emb, repeat_kv = _rotary_helpers()
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        b, n, _ = x.shape
        last = (key_valid.long() * torch.arange(n, device=h.device)).argmax(dim=1)
        rows = torch.arange(b, device=h.device)
        q = attn.q_proj(x[rows, last][:, None]).view(b, 1, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = self.lm.rotary_emb(h, position_ids=position_ids)
        q = apply_rotary_pos_emb(q, q, cos[rows, last][:, None], sin[rows, last][:, None])[0]
        k = apply_rotary_pos_emb(k, k, cos, sin)[1]
        k = repeat_kv(k, attn.num_key_value_groups)
        logits = (q.float() @ k.float().transpose(-2, -1)) * attn.scaling  # (B, heads, 1, L)
        visible = key_valid & (torch.arange(n, device=h.device)[None] <= last[:, None])
        logits = logits.masked_fill(~visible[:, None, None], float("-inf"))
        return logits.softmax(dim=-1).mean(dim=1)[:, 0]

    def drop(self, layer: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Keeps the top image tokens (original order) and every other token; gathers every per-token tensor."""
        image = state["image"]
        counts = image.sum(dim=1)
        if int(counts.max()) == 0:
            return state
        if int(counts.min()) != int(counts.max()):
            raise ValueError(f"PyramidDrop needs the same number of image tokens in every sample of a batch, got "
                             f"{counts.tolist()}; batch samples with equal image counts or run them one by one")
        scores = self.image_scores(layer, state["hidden"], state["position_ids"], state["key_valid"])
        keep = self.kept_count(int(counts[0]))
        top = scores.masked_fill(~image, float("-inf")).topk(keep, dim=1).indices
        kept = ~image
        kept[torch.arange(image.shape[0], device=image.device)[:, None], top] = True
        idx = kept.nonzero()[:, 1].view(image.shape[0], -1)  # row-major: original order
        out = {k: v.gather(1, idx.view(*idx.shape, *([1] * (v.ndim - 2))).expand(-1, -1, *v.shape[2:]))
               for k, v in state.items()}
        return out


def _lm_forward_with(drop: PyramidDrop):
    from transformers import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPast

    def forward(lm, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = lm.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=lm.config)
        b, q = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        device = inputs_embeds.device
        if position_ids is None:
            position_ids = (torch.arange(q, device=device) + past)[None].expand(b, -1)
        new_valid = (attention_mask[:, -q:].bool() if attention_mask is not None
                     else torch.ones(b, q, dtype=torch.bool, device=device))
        if past == 0:
            h = _prefill(drop, lm, inputs_embeds, position_ids, new_valid, cache, use_cache, kwargs)
        else:
            h = _decode(drop, lm, inputs_embeds, position_ids, new_valid, cache, use_cache, kwargs)
        return BaseModelOutputWithPast(last_hidden_state=lm.norm(h), cache=cache)

    return forward


def _prefill(drop, lm, embeds, position_ids, valid, cache, use_cache, kwargs):
    image = drop._image_mask
    if image is None or image.shape != valid.shape:
        raise ValueError("PyramidDrop needs the prompt's input_ids (image tokens are located from them); "
                         "pass input_ids rather than inputs_embeds")
    b, n = valid.shape
    state = dict(hidden=embeds, position_ids=position_ids, key_valid=valid, image=image.to(valid.device),
                 index=torch.arange(n, device=valid.device)[None].expand(b, -1))
    keys, lengths = [], []
    for i, layer in enumerate(lm.layers[: lm.config.num_hidden_layers]):
        if i in drop.layers:
            state = drop.drop(layer, state)
        h = state["hidden"]
        mask = _additive_mask(state["key_valid"], h.shape[1], h.dtype)
        pe = lm.rotary_emb(h, position_ids=state["position_ids"])
        state["hidden"] = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=state["position_ids"],
                                cache=cache, use_cache=use_cache, **kwargs)
        keys.append(state["key_valid"])
        lengths.append(h.shape[1])
    drop.kept_positions, drop.stage_lengths = state["index"], lengths
    if cache is not None:
        drop._layer_keys = {id(cache): keys}  # one live generation at a time
    return state["hidden"]


def _decode(drop, lm, embeds, position_ids, new_valid, cache, use_cache, kwargs):
    keys = drop._layer_keys.get(id(cache))
    if keys is None:
        raise RuntimeError("PyramidDrop: this cache was not filled by a PyramidDrop prefill")
    h = embeds
    pe = lm.rotary_emb(h, position_ids=position_ids)  # original positions continue after the prompt
    for i, layer in enumerate(lm.layers[: lm.config.num_hidden_layers]):
        keys[i] = torch.cat([keys[i], new_valid], dim=1)
        mask = _additive_mask(keys[i], h.shape[1], h.dtype)
        h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=position_ids, cache=cache,
                  use_cache=use_cache, **kwargs)
    return h
