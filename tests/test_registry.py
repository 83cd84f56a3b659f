"""The zoo registry: families, model lists, per-model facts and create_model's errors."""
from __future__ import annotations

import pytest
import timm
import torch

import zoo
from zoo import registry

EXPECTED_FAMILIES = ["vim", "msvmamba", "vmamba", "convllava", "efficientvim", "shvit", "vitamin", "convnext"]


def test_families_and_their_models():
    assert zoo.list_families() == registry.list_families() == EXPECTED_FAMILIES
    assert zoo.model_info is registry.model_info and zoo.create_model is registry.create_model
    # families reused from timm list timm's own models plus the zoo's test variant
    for family, released in [("efficientvim", "efficientvim_m1"), ("shvit", "shvit_s1"),
                             ("vitamin", "vitamin_small_224"), ("convnext", "convnext_tiny"),
                             ("convllava", "convllava_large"), ("vmamba", "vmamba_tiny")]:
        names = zoo.list_models(family=family)
        assert released in names and f"test_{family}" in names, family
        assert all(timm.is_model(n) for n in names)
    assert "efficientvim_m4_dist" in zoo.list_models("efficientvim")
    assert "convnextv2_tiny" in zoo.list_models("convnext")
    assert not set(zoo.list_models("convnext")) & set(zoo.list_models("convllava"))


def test_every_model_in_exactly_one_family():
    everything = zoo.list_models()
    per_family = [n for f in registry.list_families() for n in zoo.list_models(family=f)]
    assert sorted(per_family) == everything
    assert len(set(everything)) == len(everything)
    for name in everything[::7]:  # a spread sample keeps this fast
        assert name in zoo.list_models(family=registry.get_family(name))


def test_include_test_flag_and_test_variants():
    released = zoo.list_models(include_test=False)
    assert released and not any(n.startswith("test_") for n in released)
    tests = registry.list_test_models()
    assert {"test_convllava", "test_efficientvim", "test_shvit", "test_vitamin", "test_convnext"} <= set(tests)
    for name in tests:
        family = registry.get_family(name)
        assert registry._FAMILY_BY_NAME[family].test_model == name
        assert registry.model_info(name).is_test


def test_unregistered_family_lists_nothing_and_unknown_family_errors():
    with pytest.raises(ValueError, match="unknown family 'nope'.*convllava"):
        zoo.list_models(family="nope")
    ghost = registry.Family("ghost", "zoo", ("no_such_module",), "test_ghost")
    registry._FAMILY_BY_NAME["ghost"] = ghost
    try:
        assert registry.list_models(family="ghost") == []
    finally:
        del registry._FAMILY_BY_NAME["ghost"]


@pytest.mark.parametrize("name", ["test_convnext", "test_efficientvim", "test_convllava", "shvit_s1"])
def test_model_info_matches_a_real_build(name):
    info = registry.model_info(name)
    model = timm.create_model(name)
    assert info.num_params == sum(p.numel() for p in model.parameters())
    assert info.feature_channels == tuple(f["num_chs"] for f in model.feature_info)
    assert info.feature_reductions == tuple(f["reduction"] for f in model.feature_info)
    assert info.num_features == model.num_features
    assert info.input_size == model.pretrained_cfg["input_size"]
    assert info.family == registry.get_family(name)


def test_model_info_facts():
    info = registry.model_info("convnext_tiny")
    assert (info.family, info.source, info.is_test) == ("convnext", "timm", False)
    assert info.feature_reductions == (4, 8, 16, 32) and info.feature_channels == (96, 192, 384, 768)
    assert 28e6 < info.num_params < 29e6  # ConvNeXt-T is published as 28.6M
    llava = registry.model_info("convllava_large")
    assert (llava.source, llava.num_classes, llava.num_features) == ("zoo", 0, 3072)
    assert llava.feature_reductions == (4, 8, 16, 32, 64) and llava.input_size == (3, 1536, 1536)
    assert registry.model_info("vitamin_small_224").fixed_input_size
    assert not registry.model_info("efficientvim_m1").fixed_input_size
    assert registry.get_family("convnext_tiny.fb_in1k") == "convnext"


def test_unknown_names_give_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'convnext_tinny'.*convnext_tiny"):
        zoo.create_model("convnext_tinny")
    with pytest.raises(ValueError, match="not a zoo model.*convnext_tiny"):
        registry.get_family("convnext_tinyy")
    with pytest.raises(ValueError, match="not a zoo model"):
        registry.model_info("resnet18")


def test_create_model_guards_fixed_input_size():
    with torch.device("meta"):
        model = zoo.create_model("vitamin_small_224")
        with pytest.raises(ValueError, match="fixed input size of 224x224.*320"):
            model(torch.empty(1, 3, 224, 320))
    dynamic = zoo.create_model("test_vitamin", dynamic_img_size=True, num_classes=3).eval()
    with torch.no_grad():
        assert dynamic(torch.randn(1, 3, 64, 96)).shape == (1, 3)
    # timm.create_model on the zoo's own test variant is guarded too
    with pytest.raises(ValueError, match="64x96"):
        timm.create_model("test_vitamin")(torch.randn(1, 3, 64, 96))


def test_every_landed_family_has_its_test_variant():
    """A family with models but no test variant would silently escape the conformance suite."""
    for family in registry.FAMILIES:
        if registry.list_models(family=family.name):
            assert family.test_model in registry.list_test_models(), family.name
            assert family.test_model in registry.list_models(family=family.name), family.name
