"""Hugging Face transformers integration: a zoo backbone as the vision tower of a ``LlavaForConditionalGeneration``.

Why not ``TimmWrapperConfig(architecture=...)`` directly: LLaVA's projector reads
``vision_config.hidden_size`` (TimmWrapperConfig has none), and LLaVA indexes the tower's ``hidden_states``,
which TimmWrapper fills from ``forward_intermediates`` in NCHW, while the projector needs (B, tokens, C);
it also drops ``hidden_states[..., 0]`` as the class token whatever the model. Both are properties of the
wrapper, not of the backbones, so zoo registers its own pair with the Auto classes instead:

* ``ZooVisionConfig`` (``model_type='zoo_vision'``): the timm architecture name and its kwargs, input size,
  the layer LLaVA will select, token reduction; ``hidden_size``/``patch_size``/``num_patches`` are derived
  from the backbone (a weight-free meta build), so the projector gets the right width.
* ``ZooVisionModel``: builds the backbone with timm's builder and returns ``hidden_states`` in LLaVA's
  convention: ``hidden_states[k]`` is (B, [cls +] tokens, C) after block k (token models) or stage k
  (hierarchical models); the class token, when the model has one, is first (so LLaVA's 'default' strategy
  drops exactly it); ``hidden_states[0]`` (embeddings) is not exposed and raises a clear error.

``llava_config(vision_config, text_config)`` builds the matching ``LlavaConfig`` (feature layer, select
strategy, image_seq_length). Importing this module registers the pair with AutoConfig/AutoModel.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from transformers import AutoConfig, AutoModel, LlavaConfig, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .encoder import VisionEncoder, create_backbone, default_image_size
from .features import resolve_layer

__all__ = ["ZooVisionConfig", "ZooVisionModel", "llava_config", "HiddenStates"]


class ZooVisionConfig(PreTrainedConfig):
    r"""
    architecture (`str`): timm/zoo model name, built through timm's builder.
    model_args (`dict`, *optional*): extra kwargs for ``timm.create_model``.
    image_size (`int`, *optional*): input resolution (default: the model's pretrained_cfg input size).
    feature_layer (`int`, *optional*): the hidden state LLaVA selects (``vision_feature_layer``): block (token
        models, default -2) or stage (hierarchical models, default -1), 1-based, negatives from the end.
    keep_tokens / keep_ratio / reduction: training-free token reduction (see ``zoo.vlm.reduction``).
    hidden_size, patch_size, num_patches, num_prefix_tokens, has_class_token: derived from the backbone.
    """

    model_type = "zoo_vision"

    architecture: str = "test_vit"
    model_args: dict | None = None
    image_size: int | None = None
    feature_layer: int | None = None
    keep_tokens: int | None = None
    keep_ratio: float | None = None
    reduction: str = "auto"
    hidden_size: int | None = None
    patch_size: int | None = None
    num_patches: int | None = None
    has_class_token: bool | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.hidden_size is None or self.num_patches is None or self.feature_layer is None:
            self._derive_from_backbone()

    def _derive_from_backbone(self) -> None:
        encoder = _build_encoder(self, meta=True)
        self.image_size = encoder.image_size
        self.feature_layer = self.feature_layer if self.feature_layer is not None else _default_layer(encoder)
        self.hidden_size = encoder.hidden_size
        self.patch_size = encoder.stride
        self.num_patches = encoder.num_patches
        self.has_class_token = encoder.layout.has_class_token


def _default_layer(encoder: VisionEncoder) -> int:
    return -2 if encoder.layout.kind == "tokens" else -1


def _build_encoder(config: ZooVisionConfig, meta: bool, model: Optional[torch.nn.Module] = None) -> VisionEncoder:
    if model is None:
        model = create_backbone(config.architecture, image_size=config.image_size, model_args=config.model_args,
                                meta=meta)
    size = default_image_size(model, config.image_size)
    layer = config.feature_layer
    probe = VisionEncoder(model, size)  # layout only, to pick the default layer
    if layer is None:
        layer = _default_layer(probe)
    if layer == 0:
        raise ValueError("feature_layer=0 (the embedding output) is not exposed by zoo vision models; "
                         "use k >= 1 (after block/stage k) or a negative index")
    if probe.layout.kind == "tokens":
        kw = dict(select_layer=layer)
    else:
        kw = dict(select_stage=resolve_layer(probe.layout, layer, hf_convention=True))
    return VisionEncoder(model, size, keep_tokens=config.keep_tokens, keep_ratio=config.keep_ratio,
                         reduction=config.reduction, **kw)


class HiddenStates(tuple):
    """Per-layer features indexed like Hugging Face hidden states; index 0 (embeddings) raises a clear error."""

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, int):
            pos = index if index >= 0 else len(self) + index
            if pos == 0:
                raise ValueError(
                    "hidden_states[0] (the embedding output) is not exposed by zoo vision models; select "
                    f"1..{len(self) - 1} (after that block/stage) or a negative index (-1 last, -2 penultimate)"
                )
        return super().__getitem__(index)


class ZooVisionModel(PreTrainedModel):
    """Any zoo/timm backbone as a transformers vision model (the ``zoo_vision`` model type)."""

    config_class = ZooVisionConfig
    config: ZooVisionConfig
    base_model_prefix = "zoo_vision"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["ZooVisionModel"]
    _supports_sdpa = True  # timm attention dispatches to SDPA itself

    def __init__(self, config: ZooVisionConfig):
        super().__init__(config)
        # built through timm's builder (pretrained_cfg, feature_cfg, checkpoint filter all apply)
        self.timm_model = create_backbone(config.architecture, image_size=config.image_size,
                                          model_args=config.model_args)
        object.__setattr__(self, "encoder", _build_encoder(config, meta=False, model=self.timm_model))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        # timm's constructor already initialised every weight its own way; keep it
        return

    def get_input_embeddings(self) -> None:
        return None

    def _selected_positions(self) -> Sequence[int]:
        return list(range(self.encoder.layout.num_layers))

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | int | list | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling | Tuple[torch.Tensor, ...]:
        """``last_hidden_state``: (B, [cls +] tokens, C) of ``config.feature_layer``; ``hidden_states``: every
        block/stage in LLaVA's indexing (see module docstring); ``pooler_output``: class token or token mean."""
        enc = self.encoder
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        positions = self._selected_positions()
        feats, attn_scores = enc.forward_layers(pixel_values, positions)
        ref = feats[enc.position]
        layers = []
        for pos, f in enumerate(feats):
            if enc.layout.kind == "tokens" or pos == enc.position:
                tokens = enc.reduce(f, attn_scores, reference=ref)  # one token selection for every block
            else:
                tokens = f.patches  # other stages have other grids: left unreduced
            if f.prefix is not None:
                tokens = torch.cat([f.prefix[:, :1], tokens], dim=1)  # class token first, registers dropped
            layers.append(tokens)
        selected = layers[enc.position]
        pooled = selected[:, 0] if enc.layout.has_class_token else selected.mean(dim=1)
        hidden_states = HiddenStates([None] + layers)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            return (selected, pooled, hidden_states)
        return BaseModelOutputWithPooling(last_hidden_state=selected, pooler_output=pooled,
                                          hidden_states=hidden_states)


def _layer_width(config: ZooVisionConfig, layer: int) -> int:
    encoder = _build_encoder(config, meta=True)
    return encoder.layout.channels[resolve_layer(encoder.layout, layer, hf_convention=True)]


def llava_config(vision_config: ZooVisionConfig, text_config: Any, **kwargs: Any) -> LlavaConfig:
    """A ``LlavaConfig`` consistent with the zoo vision config.

    Sets ``vision_feature_layer`` to the layer the vision config sized its ``hidden_size`` for,
    ``vision_feature_select_strategy`` to 'default' (drop the class token) for models with a class token and
    'full' for models without one, and ``image_seq_length`` to the token count the projector receives.
    ``vision_feature_layer`` may be overridden (e.g. a list of blocks, concatenated by LLaVA) as long as every
    selected layer has the config's width.
    """
    strategy = kwargs.pop("vision_feature_select_strategy", "default" if vision_config.has_class_token else "full")
    if strategy == "default" and not vision_config.has_class_token:
        raise ValueError(
            f"{vision_config.architecture} has no class token: vision_feature_select_strategy='default' would drop "
            "a real patch token; use 'full'"
        )
    layer = kwargs.pop("vision_feature_layer", vision_config.feature_layer)
    layers = layer if isinstance(layer, (list, tuple)) else [layer]
    if any(_layer_width(vision_config, k) != vision_config.hidden_size for k in layers):
        raise ValueError(
            f"vision_feature_layer={layer} selects layers of another width than hidden_size="
            f"{vision_config.hidden_size} (set by feature_layer={vision_config.feature_layer}); hierarchical models "
            "have one width per stage, so select one stage and give it as ZooVisionConfig(feature_layer=...)"
        )
    tokens = vision_config.num_patches + (1 if strategy == "full" and vision_config.has_class_token else 0)
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=tokens,
        **kwargs,
    )


AutoConfig.register(ZooVisionConfig.model_type, ZooVisionConfig, exist_ok=True)
AutoModel.register(ZooVisionConfig, ZooVisionModel, exist_ok=True)
