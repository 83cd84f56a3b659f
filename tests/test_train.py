"""Fast checks of the training engine: configs, clear errors, seeded data order, checkpoints, fine-tuning."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import zoo  # noqa: F401  (registers the zoo models)
from zoo.train import ConfigError, config_from_args, make_config
from zoo.train.checkpoint import atomic_save, capture_rng_state, load_finetune_weights, restore_rng_state
from zoo.train.config import DIGITS_PRESET
from zoo.train.data import ShardSampler, build_datasets, build_train_sampler
from zoo.train.engine import build_model

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_every_recipe_loads_and_validates():
    assert len(CONFIGS) >= 8
    for path in CONFIGS:
        cfg = config_from_args(["-c", str(path), "--data-dir", "/nonexistent"])
        assert cfg.model, path
        # global batch must split into per-GPU batches on the official 8-GPU layout
        if cfg.batch_size:
            assert cfg.global_batch_size % cfg.batch_size == 0, path


def test_vim_recipes_match_the_official_numbers():
    tiny = config_from_args(["-c", str(REPO / "configs/vim_tiny.yaml")])
    assert (tiny.global_batch_size, tiny.epochs, tiny.lr, tiny.weight_decay, tiny.warmup_epochs, tiny.min_lr) == (
        1024, 300, 1e-3, 0.1, 5, 1e-5)
    assert (tiny.ema_decay, tiny.mixup, tiny.cutmix, tiny.smoothing, tiny.reprob, tiny.repeated_aug,
            tiny.drop_path) == (0.99996, 0.8, 1.0, 0.1, 0.25, 3, 0.0)
    assert tiny.aa.startswith("rand-m9") and tiny.amp == "bf16"
    small = config_from_args(["-c", str(REPO / "configs/vim_small.yaml")])
    assert (small.global_batch_size, small.weight_decay, small.drop_path) == (512, 0.05, 0.05)
    msv = config_from_args(["-c", str(REPO / "configs/msvmamba_tiny.yaml")])
    assert (msv.global_batch_size, msv.lr, msv.weight_decay, msv.warmup_epochs, msv.clip_grad, msv.drop_path,
            msv.ema_decay) == (1024, 1e-3, 0.05, 20, 5.0, 0.2, 0.9999)


def test_flags_override_recipe_and_digits_preset_mirrors_its_file():
    cfg = config_from_args(["-c", str(REPO / "configs/vim_tiny.yaml"), "--lr", "5e-4", "--no-ema",
                            "--scale", "[0.5, 1.0]", "--layer-shuffle-prob", "0.3", "--clip-grad", "null"])
    assert cfg.lr == 5e-4 and cfg.ema is False and cfg.scale == [0.5, 1.0] and cfg.layer_shuffle_prob == 0.3
    assert cfg.clip_grad is None and cfg.weight_decay == 0.1  # untouched keys keep the recipe's value
    default = config_from_args([])  # no config, no data: the embedded digits default
    assert default.data_dir is None and default.model == "test_vim" and default.epochs == DIGITS_PRESET["epochs"]
    assert yaml.safe_load((REPO / "configs/digits_test_vim.yaml").read_text()) == DIGITS_PRESET


@pytest.mark.parametrize("argv, needle", [
    (["--amp", "fp8"], "'amp'"),
    (["--smoothing", "1.5"], "'smoothing'"),
    (["--epochs", "0"], "'epochs'"),
    (["--scale", "[1.0, 0.2]"], "'scale'"),
    (["--clip-grad", "1.0", "--clip-mode", "agc"], "'clip_mode'"),  # was silently run as norm clipping
])
def test_bad_values_name_the_key(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        config_from_args(argv)


def test_bad_config_file_and_unknown_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: test_vim\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        config_from_args(["-c", str(bad)])
    with pytest.raises(ConfigError, match="not found"):
        config_from_args(["-c", str(tmp_path / "missing.yaml")])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        config_from_args(["-c", str(tmp_path / "list.yaml")])


def test_missing_or_empty_data_and_unknown_model_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_datasets(make_config({"data_dir": str(tmp_path / "nope")}))
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no images|empty"):
        build_datasets(make_config({"data_dir": str(tmp_path)}))
    with pytest.raises(ConfigError, match="unknown model 'vim_tinyy_patch16_224'.*vim_tiny_patch16_224"):
        build_model(make_config({"model": "vim_tinyy_patch16_224"}), 10)
    with pytest.raises(ConfigError, match="layer_shuffle_prob"):
        build_model(make_config({"model": "test_vit", "layer_shuffle_prob": 0.5}), 10)


def test_digits_split_is_real_and_disjoint():
    data = build_datasets(make_config({}))
    train, val = data.train, data.val
    assert (len(train), len(val), data.num_classes) == (1501, 296, 10)
    assert sorted(set(val.targets)) == list(range(10))
    train_keys = {im.tobytes() for im in train.images}
    overlap = sum(im.tobytes() in train_keys for im in val.images)
    assert overlap < 5  # a few digit scans are pixel-identical duplicates in the source set
    img, label = train[0]
    assert img.mode == "RGB" and img.size == (8, 8) and 0 <= label < 10


def test_epoch_order_and_seeds_match_across_world_sizes():
    """W processes with batch B/W see exactly the (index, augmentation seed) pairs of one process with B."""
    cfg = make_config({"seed": 3})
    data = list(range(24))
    single = build_train_sampler(data, cfg, rank=0, world_size=1)
    single.set_epoch(2)
    pairs_single = list(single)
    shards = []
    for rank in range(2):
        s = build_train_sampler(data, cfg, rank=rank, world_size=2)
        s.set_epoch(2)
        shards.append(list(s))
    interleaved = [p for pair in zip(*shards) for p in pair]
    assert interleaved == pairs_single
    assert len({seed for _, seed in pairs_single}) == len(pairs_single)
    # resuming part-way through the epoch continues with the same pairs
    single.set_epoch(2, start=10)
    assert list(single) == pairs_single[10:]
    single.set_epoch(3)
    assert [i for i, _ in single] != [i for i, _ in pairs_single]
    assert sorted(i for r in range(3) for i in ShardSampler(10, r, 3)) == list(range(10))


def test_seeded_transform_is_reproducible_and_leaves_global_rng_alone():
    from timm.data import create_transform

    from zoo.train.data import SeededTransformDataset, _patch_zero_bit_posterize

    images = [Image.fromarray(np.random.RandomState(i).randint(0, 255, (20, 20, 3), dtype=np.uint8))
              for i in range(4)]
    tf = create_transform(16, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    _patch_zero_bit_posterize(tf)
    ds = SeededTransformDataset([(im, 0) for im in images], tf)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = ds[(1, 1234)][0]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, ds[(1, 1234)][0])
    assert not torch.equal(a, ds[(1, 999)][0])


def test_posterize_zero_bits_blackens_instead_of_raising():
    from zoo.train.data import _posterize_allow_zero

    img = Image.new("RGB", (4, 4), (200, 100, 50))
    assert np.asarray(_posterize_allow_zero(img, 0)).max() == 0
    assert tuple(np.asarray(_posterize_allow_zero(img, 1))[0, 0]) == (128, 0, 0)
    assert _posterize_allow_zero(img, 8) is img


def test_checkpoint_is_weights_only_and_rng_round_trips(tmp_path):
    import random

    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    state = capture_rng_state()
    path = tmp_path / "ck.pth"
    atomic_save({"rng": [state], "model": {"w": torch.ones(2)}, "epoch": 1}, path)
    assert not list(tmp_path.glob(".*tmp*"))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    loaded = torch.load(path, weights_only=True)
    restore_rng_state(loaded["rng"][0])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
    # a failed write (here: an object torch.save cannot pickle) keeps the previous file and leaves no temp file
    with pytest.raises(Exception):
        atomic_save({"model": {"w": torch.zeros(2)}, "epoch": 2, "bad": lambda: None}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert not list(tmp_path.glob(".*tmp*"))


def _official_vim_state(model: torch.nn.Module) -> dict:
    """test_vim weights renamed to the official Vim layout (layers.i.mixer..., norm_f)."""
    from zoo.models import vim as vim_module

    inverse = {}
    for key in model.state_dict():
        for candidate in _official_candidates(key):
            if vim_module._map_official_key(candidate) == key:
                inverse[key] = candidate
                break
    assert len(inverse) == len(model.state_dict())
    return {"model": {inverse[k]: v.clone() for k, v in model.state_dict().items()}}


def _official_candidates(key: str):
    yield key
    if key.startswith("norm."):
        yield "norm_f." + key[len("norm."):]
    if key.startswith("blocks."):
        _, idx, rest = key.split(".", 2)
        yield f"layers.{idx}.{rest}"
        if rest.startswith("mixer."):
            from zoo.models import vim as vim_module

            name = rest[len("mixer."):]
            for old, new in vim_module._MIXER_KEY_MAP.items():
                if name == new or (new.endswith(".") and name.startswith(new)):
                    yield f"layers.{idx}.mixer.{old}{name[len(new):]}"


def test_finetune_goes_through_the_checkpoint_filter(tmp_path):
    """Official-layout Vim weights at 32 px / 1000 classes load into a 48 px / 7-class model: keys mapped by
    vim.checkpoint_filter_fn, pos_embed resampled to the new grid, the mismatched head left at its init."""
    torch.manual_seed(0)
    source = build_model(make_config({"model": "test_vim", "img_size": 32}), 1000)
    path = tmp_path / "vim_official.pth"
    torch.save(_official_vim_state(source), path)
    target = build_model(make_config({"model": "test_vim", "img_size": 48}), 7)
    head_before = target.head.weight.detach().clone()
    report = load_finetune_weights(target, path)
    assert "head.weight" in report["dropped"] and not report["unexpected"]
    assert torch.equal(target.head.weight, head_before)
    src, dst = source.state_dict(), target.state_dict()
    assert dst["pos_embed"].shape[1] == (48 // 8) ** 2 + 1 != src["pos_embed"].shape[1]
    same = [k for k in src if k not in ("pos_embed", "head.weight", "head.bias")]
    assert all(torch.equal(src[k], dst[k]) for k in same)
    with pytest.raises(FileNotFoundError, match="--finetune"):
        load_finetune_weights(target, tmp_path / "missing.pth")


def test_repeated_augmentation_gives_each_copy_its_own_seed():
    cfg = make_config({"repeated_aug": 3, "seed": 1})
    data = list(range(12))
    seen = {}
    for rank in range(2):
        sampler = build_train_sampler(data, cfg, rank=rank, world_size=2)
        sampler.set_epoch(0)
        for index, seed in sampler:
            seen.setdefault(index, []).append((rank, seed))
    copies = [v for v in seen.values() if len(v) > 1]
    assert copies, "repeated augmentation should show an image more than once per epoch"
    for v in copies:
        assert len({seed for _, seed in v}) == len(v)  # each copy is augmented differently
        assert len({rank for rank, _ in v}) > 1  # and copies land on different ranks

    # the image order follows the run's seed (timm's sampler alone shuffles by the epoch number only)
    def order(seed: int) -> list:
        sampler = build_train_sampler(list(range(64)), make_config({"repeated_aug": 3, "seed": seed}), 0, 1)
        sampler.set_epoch(0)
        return [index for index, _ in sampler]

    assert order(1) == order(1) and order(1) != order(2)


class _NoSchedule:
    def step_update(self, num_updates):
        pass


def test_nonfinite_loss_stops_with_a_clear_error():
    """The loss is read at log intervals (no per-step host sync): a NaN/inf loss stops the epoch at the next
    read, naming the steps; with amp none the hint does not suggest --amp none (it printed amp=None)."""
    from zoo.train import NonFiniteLossError
    from zoo.train.engine import TrainState, train_one_epoch

    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x[:, :3] * self.w / 0.0

    model = Exploding()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.ones(2, 4), torch.zeros(2, dtype=torch.long))] * 4
    for dtype, amp_text in ((None, "amp none"), (torch.bfloat16, "amp bf16")):
        with pytest.raises(NonFiniteLossError, match=f"between global step 0 and 2 .*{amp_text}") as info:
            train_one_epoch(model, batches, criterion=torch.nn.CrossEntropyLoss(), optimizer=optimizer,
                            scheduler=_NoSchedule(), scaler=torch.amp.GradScaler("cpu", enabled=False),
                            state=TrainState(), steps=4, accum_steps=1, device=torch.device("cpu"), dtype=dtype,
                            log_interval=2)
        assert ("--amp none" in str(info.value)) == (dtype is not None)
        assert "None" not in str(info.value)


def test_rejected_keyword_after_dropping_img_size_is_still_a_config_error(monkeypatch):
    """A size-agnostic model that rejects img_size first and then another keyword: the retry without
    img_size must end in the clear ConfigError, not a raw TypeError."""
    import zoo

    def fake_create(name, **kwargs):
        for key in ("img_size", "foo_option"):
            if key in kwargs:
                raise TypeError(f"__init__() got an unexpected keyword argument '{key}'")
        return torch.nn.Identity()

    monkeypatch.setattr(zoo, "create_model", fake_create)
    assert isinstance(build_model(make_config({"model": "test_convnext", "img_size": 32}), 3), torch.nn.Identity)
    with pytest.raises(ConfigError, match="'foo_option'"):
        build_model(make_config({"model": "test_convnext", "img_size": 32, "model_kwargs": {"foo_option": 1}}), 3)


def test_script_reports_a_missing_resume_checkpoint_without_traceback(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", REPO / "train_imagenet.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    missing = tmp_path / "nope" / "last.pth"
    code = script.main(["--resume", str(missing), "--output", str(tmp_path), "--experiment", "x", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(missing) in err and "Traceback" not in err


def test_loss_is_read_from_the_device_only_at_log_intervals(monkeypatch):
    """No per-step host sync: over 10 steps with log_interval 5 the loss sums are fetched at steps 5 and 10
    and once at the epoch's end, and each logged loss is the mean over its window."""
    from zoo.train.engine import LossMeter, TrainState, train_one_epoch

    fetches = []
    original = LossMeter._fetch
    monkeypatch.setattr(LossMeter, "_fetch", lambda self: fetches.append(self.state.global_step) or original(self))
    model = torch.nn.Linear(4, 2)
    batches = [(torch.full((2, 4), float(i)), torch.zeros(2, dtype=torch.long)) for i in range(10)]
    logged = []
    state = TrainState()
    stats = train_one_epoch(model, batches, criterion=lambda out, t: out.sum() * 0 + float(len(logged) + 1),
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.0), scheduler=_NoSchedule(),
                            scaler=torch.amp.GradScaler("cpu", enabled=False), state=state, steps=10,
                            accum_steps=1, device=torch.device("cpu"), dtype=None, log_interval=5,
                            on_step=lambda info: info and logged.append(info))
    assert fetches == [5, 10, 10]
    assert [info["loss"] for info in logged] == [1.0, 2.0]  # window means of the constant losses
    assert stats["samples"] == 20 and stats["loss_sum"] == 2 * (5 * 1.0 + 5 * 2.0)
    assert all({"img_per_s", "peak_mem_mb"} <= set(info) for info in logged)
