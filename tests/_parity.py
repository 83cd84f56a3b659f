"""Where the official-code parity fixtures live, and what a checkout without them does.

A developer checkout without ``../shared`` skips the parity tests. CI sets ``ZOO_REQUIRE_PARITY=1``
(``.ci/run``), and then a missing or empty fixture folder is an error at collection time, so the
parity tests can never pass by silently not running.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from zoo.ops._build import env_flag

REQUIRE_ENV = "ZOO_REQUIRE_PARITY"
SHARED_PARITY = Path(__file__).resolve().parents[1].parent / "shared" / "parity"


def parity_dir(family: str) -> Path:
    return SHARED_PARITY / family


def parity_files(family: str, pattern: str, keep: Optional[Callable[[Path], bool]] = None) -> List[Path]:
    """The files of ``family``'s fixture folder matching ``pattern`` (sorted); [] when absent, unless required."""
    folder = parity_dir(family)
    files = sorted(p for p in folder.glob(pattern) if keep is None or keep(p)) if folder.is_dir() else []
    if not files and env_flag(REQUIRE_ENV):
        raise RuntimeError(
            f"{REQUIRE_ENV}=1 but no {pattern!r} parity files for {family!r} in {folder}: "
            "CI must run with the official fixtures at ../shared/parity"
        )
    return files


def fixture_id(path: Path) -> str:
    """pytest id of a fixture or manifest file: its name without the suffix."""
    return path.stem


def load_fixture(sidecar: Path) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """(sidecar JSON, every tensor of the .safetensors next to it, the official state dict stored in it
    under ``state_dict.``)."""
    from safetensors.torch import load_file

    meta = json.loads(sidecar.read_text())
    tensors = load_file(str(sidecar.with_suffix(".safetensors")))
    official_sd = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    return meta, tensors, official_sd


class FakeCfgNode(dict):
    """Stands in for the yacs CfgNode that official VMamba-codebase checkpoints pickle (a dict subclass
    that ``torch.load(weights_only=True)`` refuses)."""


def check_official_style_file(tmp_path: Path, model_name: str, official_sd: Dict[str, Any], model_args: Dict[str, Any],
                              filter_fn: Callable, probe: Tuple[str, str]) -> None:
    """An official-layout .pth (weights under 'model' next to a pickled yacs config, as the VMamba codebase
    saves them) built through timm's ``pretrained_cfg_overlay=dict(file=...)``: every converted tensor loads;
    with another head size the backbone (``probe``: zoo key, official key) loads and the head is new."""
    import timm
    import torch

    path = tmp_path / "official_style.pth"
    torch.save({"model": official_sd, "config": FakeCfgNode(NAME="x"), "epoch": 299}, path)
    overlay = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    own = timm.create_model(model_name, **overlay, **model_args).state_dict()
    for key, value in filter_fn(official_sd).items():
        assert torch.equal(own[key], value), key
    model = timm.create_model(model_name, **overlay, **dict(model_args, num_classes=3))
    assert torch.equal(model.state_dict()[probe[0]], official_sd[probe[1]])
    assert model.get_classifier().out_features == 3


def older_vmamba_codebase_names(official_sd: Dict[str, Any]) -> Dict[str, Any]:
    """The same weights under the names older VMamba-codebase checkpoints (VMamba, MSVMamba) use: ln_1 and
    self_attention in the blocks, patch_embed.proj / norm, and no classifier prefix."""
    out = {}
    for key, value in official_sd.items():
        key = key.replace("patch_embed.0.", "patch_embed.proj.").replace("patch_embed.2.", "patch_embed.norm.")
        if ".blocks." in key:
            key = key.replace(".norm.", ".ln_1.").replace(".op.", ".self_attention.")
        out[key.replace("classifier.", "")] = value
    return out


def load_manifest_on_meta(manifest: Path, official_to_zoo: Dict[str, str], filter_fn: Callable) -> Tuple[Any, Dict[str, Any]]:
    """A released checkpoint's key/shape manifest loaded strictly, through ``filter_fn``, into the registered
    model it names, built on the meta device (shapes only: no memory for the full-size weights); the
    parameter count must be the manifest's. Returns the model and the manifest."""
    import timm
    import torch

    meta = json.loads(manifest.read_text())
    with torch.device("meta"):
        model = timm.create_model(official_to_zoo[meta["official_model_name"]])
    official_sd = {k: torch.empty(shape, device="meta") for k, shape in meta["keys"].items()}
    assert len(official_sd) == meta["num_state_dict_tensors"]
    model.load_state_dict(filter_fn(official_sd, model), strict=True)
    assert sum(p.numel() for p in model.parameters()) == meta["num_params"]
    return model, meta


def assert_matches_official(model: Any, meta: Dict[str, Any], tensors: Dict[str, Any]) -> None:
    """A hierarchical model (eval, official weights loaded) against its fixture, within the sidecar's
    tolerance: logits and pre-logits from ``forward_intermediates`` + ``forward_head``, and every stage."""
    import torch

    tol = dict(rtol=meta["rtol"], atol=meta["atol"])
    with torch.no_grad():
        final, stages = model.forward_intermediates(tensors["input"])
        torch.testing.assert_close(model.forward_head(final), tensors["logits"], **tol)
        torch.testing.assert_close(model.forward_head(final, pre_logits=True), tensors["pre_logits"], **tol)
    assert len(stages) == len([k for k in tensors if k.startswith("intermediates.stage")])
    for i, y in enumerate(stages):
        torch.testing.assert_close(y, tensors[f"intermediates.stage{i}"], **tol, msg=lambda m: f"stage {i}: {m}")
