"""PyramidDrop (zoo.vlm.pyramid_drop) on a tiny random LLaVA, against a by-hand reference: the rule recomputed
from each layer's own materialised (eager) attention weights, on full no-cache recomputation."""
from __future__ import annotations

import pytest
import torch

import zoo  # noqa: F401

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlavaForConditionalGeneration  # noqa: E402

from zoo.vlm.hf import ZooVisionConfig, llava_config  # noqa: E402
from zoo.vlm.pyramid_drop import PyramidDrop  # noqa: E402

IMAGE = 63
LAYERS, RATIO = (1, 2, 3), 0.5


def tiny_llava(seed=0):
    torch.manual_seed(seed)
    vision = ZooVisionConfig(architecture="test_vit", image_size=64)  # 16 image tokens
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2)  # grouped-query attention
    config = llava_config(vision, text, image_token_index=IMAGE)
    config.text_config._attn_implementation = "eager"  # the reference reads the attention weights
    return LlavaForConditionalGeneration(config).eval()


def prompt(n_image, before=(1, 2), after=(5, 6, 7)):
    return list(before) + [IMAGE] * n_image + list(after)


def llm_inputs(model, ids, px):
    """inputs_embeds exactly as LLaVA hands them to its language model."""
    captured = {}
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, kw: captured.update(e=kw["inputs_embeds"]),
                                        with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=px)
    finally:
        hook.remove()
    return captured["e"]


def causal(n, dtype):
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def reference_last_hidden(model, embeds, image, query_index):
    """One sample, no cache: at each stage start, layer l's own eager attention weights over the current
    sequence, row of the token at original position ``query_index``, heads averaged; top round(r * n) image
    tokens kept in original order. Returns (final normed hidden states, kept original positions per layer)."""
    lm = model.model.language_model
    x, pos, img = embeds, torch.arange(embeds.shape[1]), image.clone()
    history = []
    for i, layer in enumerate(lm.layers):
        if i in LAYERS:
            pe = lm.rotary_emb(x, position_ids=pos[None])
            _, weights = layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=pe,
                                         attention_mask=causal(x.shape[1], x.dtype))
            row = int((pos == query_index).nonzero())
            scores = weights[0, :, row].mean(0)
            candidates = img.nonzero()[:, 0]
            keep = max(1, round(RATIO * len(candidates)))
            top = candidates[scores[candidates].topk(keep).indices]
            kept = sorted(set((~img).nonzero()[:, 0].tolist()) | set(top.tolist()))
            x, pos, img = x[:, kept], pos[kept], img[kept]
        history.append(pos.clone())
        pe = lm.rotary_emb(x, position_ids=pos[None])
        x = layer(x, attention_mask=causal(x.shape[1], x.dtype), position_embeddings=pe, position_ids=pos[None])
    return lm.norm(x), history


def reference_generate(model, ids, px, steps):
    embeds = llm_inputs(model, ids, px)[0:1]
    image = ids[0] == IMAGE
    prompt_len = ids.shape[1]
    tokens, step_logits = [], []
    embed = model.model.language_model.embed_tokens
    with torch.no_grad():
        for _ in range(steps):
            h, _ = reference_last_hidden(model, embeds, torch.cat([image, torch.zeros(len(tokens), dtype=bool)]),
                                         prompt_len - 1)  # the last instruction token ranks the image tokens
            logits = model.lm_head(h[:, -1])[0]
            step_logits.append(logits.clone())
            logits[IMAGE] = float("-inf")  # as suppress_tokens
            tokens.append(int(logits.argmax()))
            embeds = torch.cat([embeds, embed(torch.tensor([[tokens[-1]]]))], dim=1)
    return tokens, torch.stack(step_logits)


def layer_io(model, ids, px, which="output"):
    """Per-layer hidden states (inputs or outputs) of one forward pass."""
    seen = []
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.append(out)) if which == "output" else
             layer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
             for layer in model.model.language_model.layers]
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=px)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_first_stage_unchanged_and_exact_kept_counts_in_original_order():
    model = tiny_llava()
    ids = torch.tensor([prompt(16)] * 2)
    px = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    plain_out = layer_io(model, ids, px)
    drop = PyramidDrop(model, layers=LAYERS, keep_ratio=RATIO)
    dropped_out = layer_io(model, ids, px)
    torch.testing.assert_close(dropped_out[0], plain_out[0], rtol=0, atol=0)  # layer 0: before the first stage
    n_text = ids.shape[1] - 16
    assert drop.stage_lengths == [n_text + 16, n_text + 8, n_text + 4, n_text + 2]
    assert [o.shape[1] for o in dropped_out] == drop.stage_lengths
    kept = drop.kept_positions
    assert torch.all(kept[:, 1:] > kept[:, :-1])  # original order
    for b in range(2):
        _, history = reference_last_hidden(model, llm_inputs(model, ids, px)[b:b + 1], ids[b] == IMAGE,
                                           ids.shape[1] - 1)
        assert kept[b].tolist() == history[-1].tolist()
        assert set((ids[b] != IMAGE).nonzero()[:, 0].tolist()) <= set(kept[b].tolist())  # text never dropped
    drop.remove()
    torch.testing.assert_close(layer_io(model, ids, px)[-1], plain_out[-1], rtol=0, atol=0)  # restored


def test_generate_matches_hand_reference_greedy():
    model = tiny_llava(seed=1)
    ids = torch.tensor([prompt(16), prompt(16, before=(3, 4), after=(9, 8, 7))])
    px = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    references = [reference_generate(model, ids[b:b + 1], px[b:b + 1], steps=5) for b in range(2)]
    expected = [tokens for tokens, _ in references]
    plain = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=5, do_sample=False,
                           suppress_tokens=[IMAGE])[:, ids.shape[1]:]
    PyramidDrop(model, layers=LAYERS, keep_ratio=RATIO)
    got = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=5, do_sample=False,
                         suppress_tokens=[IMAGE], output_logits=True, return_dict_in_generate=True)
    assert got.sequences[:, ids.shape[1]:].tolist() == expected
    assert plain.tolist() != expected  # dropping changes the answer: the test can tell them apart
    # every decoding step's logits, not only the argmax: a cache/position slip moves them
    logits = torch.stack(got.logits, dim=1)  # (B, steps, vocab)
    for b, (_, ref_logits) in enumerate(references):
        torch.testing.assert_close(logits[b], ref_logits, rtol=1e-4, atol=1e-5)


def test_training_step_with_labels():
    model = tiny_llava(seed=2).train()
    ids = torch.tensor([prompt(16)] * 2)
    labels = ids.clone()
    labels[ids == IMAGE] = -100
    labels[:, :2] = -100
    px = torch.randn(2, 3, 64, 64)
    drop = PyramidDrop(model, layers=LAYERS, keep_ratio=RATIO)
    out = model(input_ids=ids, pixel_values=px, labels=labels)
    kept_labels = labels.gather(1, drop.kept_positions)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(),
                                                 kept_labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    projector = next(model.model.multi_modal_projector.parameters())
    assert projector.grad is not None and projector.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()


def test_several_images_per_sample_are_ranked_together_and_bad_use_is_refused():
    model = tiny_llava(seed=3)
    ids = torch.tensor([[1] + [IMAGE] * 16 + [4] + [IMAGE] * 16 + [5, 6]])
    drop = PyramidDrop(model, layers=(2,), keep_ratio=0.25)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=torch.randn(2, 3, 64, 64))
    assert drop.stage_lengths[-1] == 4 + 8  # 32 image tokens from two images -> 8
    with pytest.raises(ValueError, match="same number of image tokens"):
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt(16) + [0] * 16, [IMAGE] * 32 + [1, 2, 3, 4, 5]]),
                  pixel_values=torch.randn(3, 3, 64, 64))
    drop.remove()
    with pytest.raises(ValueError, match="stage starts in 1..3"):
        PyramidDrop(model, layers=(0, 2))
    with pytest.raises(ValueError, match="keep_ratio"):
        PyramidDrop(model, layers=(1,), keep_ratio=0)
