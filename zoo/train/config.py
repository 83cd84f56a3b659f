"""Training configuration: one flat set of keys, filled from defaults, then a YAML recipe, then flags.

Every key is a field of :class:`TrainConfig`; the command line gets one ``--key-name`` flag per field,
so a recipe value can always be overridden from the shell. The resolved config is written next to the
checkpoints of every run (``config.yaml``) and stored inside each checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

__all__ = ["TrainConfig", "TrainingError", "ConfigError", "load_config", "build_arg_parser", "config_from_args", "save_config"]

AMP_CHOICES = ("bf16", "fp16", "none")


class TrainingError(Exception):
    """The run cannot go on for a reason its message explains (bad input, a full disk, a diverged loss);
    ``train_imagenet.py`` prints it as one line and exits with code 2."""


class ConfigError(TrainingError, ValueError):
    """A configuration value (or file) is invalid; the message says which key and what is accepted."""


@dataclass
class TrainConfig:
    # model
    model: str = "test_vim"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    img_size: Optional[int] = None  # None: the model's pretrained_cfg input size
    drop_path: float = 0.0
    drop: float = 0.0
    layer_shuffle_prob: float = 0.0  # ShuffleMamba layer-wise shuffle (plain Vim models only)
    channels_last: bool = False
    finetune: Optional[str] = None  # a zoo or official checkpoint to start from

    # data
    dataset: str = ""  # "" / folder: ImageFolder tree; hfds/NAME or hfds (local --data-dir): HF datasets;
    # wds: WebDataset tar shards in --data-dir (splits from _info.json, or "name-{0000..0009}.tar|N")
    num_classes: Optional[int] = None  # None: from the data (wds without class info in _info.json needs it)
    data_dir: Optional[str] = None  # folder root with train/ and val/ (hfds: the cache); None: embedded digits
    train_split: str = "train"
    val_split: str = "val"
    workers: int = 4
    skip_corrupt: bool = False  # an unreadable image is replaced by the next readable one (with a warning)
    pin_memory: bool = True
    persistent_workers: bool = True
    repeated_aug: int = 1  # >1: each image seen this many times per epoch, on different ranks (DeiT)

    # augmentation (timm's create_transform / Mixup)
    aa: Optional[str] = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    hflip: float = 0.5
    color_jitter: float = 0.3
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    train_interpolation: str = "bicubic"
    crop_pct: Optional[float] = None  # None: from the model's pretrained_cfg
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1

    # optimisation
    global_batch_size: int = 1024  # the recipe's batch, over all processes and accumulation steps
    batch_size: Optional[int] = None  # per-process micro-batch; None: global / world size (no accumulation)
    epochs: int = 300
    opt: str = "adamw"
    lr: float = 1e-3  # peak lr for global_batch_size (no further scaling)
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 5
    weight_decay: float = 0.05
    opt_eps: float = 1e-8
    opt_betas: Optional[List[float]] = None
    momentum: float = 0.9
    layer_decay: Optional[float] = None
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"
    sched: str = "cosine"
    ema: bool = True
    ema_decay: float = 0.9999
    amp: str = "bf16"

    # run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    fsdp: bool = False  # shard weights, gradients and optimizer state over the processes (FSDP2) instead of DDP
    threads: Optional[int] = None  # intra-op CPU threads per process; None: torch's default
    output: str = "runs"
    experiment: Optional[str] = None  # run folder under output; None: <model>-<timestamp>
    resume: Optional[str] = None  # a last.pth path, or "auto": <output>/<experiment>/last.pth if present
    overwrite: bool = False  # replace an earlier run's checkpoints in the same folder (else: an error)
    eval_only: bool = False
    save_every_steps: int = 0  # 0: checkpoint at the end of each epoch only
    log_interval: int = 10
    progress: bool = True
    tensorboard: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        def fail(key: str, msg: str) -> None:
            raise ConfigError(f"config key '{key}'={getattr(self, key)!r}: {msg}")

        if not isinstance(self.model, str) or not self.model:
            fail("model", "must be a model name such as 'vim_tiny_patch16_224'")
        if self.amp not in AMP_CHOICES:
            fail("amp", f"accepted values are {', '.join(AMP_CHOICES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            fail("device", "accepted values are auto, cpu, cuda")
        for key in ("epochs", "global_batch_size", "repeated_aug", "log_interval"):
            if int(getattr(self, key)) < 1:
                fail(key, "must be a positive integer")
        if self.batch_size is not None and self.batch_size < 1:
            fail("batch_size", "must be a positive integer or null")
        if self.img_size is not None and self.img_size < 1:
            fail("img_size", "must be a positive integer (pixels) or null (the model's own input size)")
        if self.threads is not None and self.threads < 1:
            fail("threads", "must be a positive integer or null (torch's default)")
        if self.resume is not None and self.overwrite:
            fail("overwrite", "cannot be combined with --resume (continue the run, or start it over)")
        if self.fsdp and self.amp == "fp16":  # GradScaler's inf check would see one rank's shard only
            fail("amp", "fp16 is not supported with --fsdp (each rank's scaler would skip steps on its own shard's "
                        "overflow); use --amp bf16 or --amp none")
        for key in ("workers", "save_every_steps"):
            if getattr(self, key) < 0:
                fail(key, "must be >= 0")
        for key in ("lr", "min_lr", "warmup_lr", "weight_decay", "warmup_epochs", "mixup", "cutmix",
                    "drop_path", "drop"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                fail(key, "must be a finite number >= 0")
        for key in ("smoothing", "reprob", "hflip", "mixup_prob", "mixup_switch_prob", "layer_shuffle_prob",
                    "drop_path", "drop"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                fail(key, "must lie in [0, 1]")
        if not 0.0 < self.ema_decay < 1.0:
            fail("ema_decay", "must lie in (0, 1)")
        if self.warmup_epochs >= self.epochs and self.epochs > 1:
            fail("warmup_epochs", f"must be smaller than epochs ({self.epochs})")
        for key in ("scale", "ratio"):
            value = getattr(self, key)
            if not (isinstance(value, (list, tuple)) and len(value) == 2 and value[0] <= value[1]):
                fail(key, "must be a pair [low, high] with low <= high")
        if self.clip_grad is not None and self.clip_grad <= 0:
            fail("clip_grad", "must be > 0 or null (no clipping)")
        if self.clip_mode not in ("norm", "value"):
            fail("clip_mode", "accepted values are norm, value")
        if self.mixup_mode not in ("batch", "pair", "elem"):
            fail("mixup_mode", "accepted values are batch, pair, elem")
        if not isinstance(self.model_kwargs, dict):
            fail("model_kwargs", "must be a mapping of extra keyword arguments for the model constructor")
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# The embedded default (no --config, no --data-dir): a tiny Vim on scikit-learn's digits, upscaled to
# 32 px, that learns on a laptop CPU in a few minutes. Mirrored in configs/digits_test_vim.yaml.
DIGITS_PRESET: Dict[str, Any] = {
    "model": "test_vim",
    "img_size": 32,
    "global_batch_size": 64,
    "epochs": 8,
    "lr": 3e-3,
    "min_lr": 1e-5,
    "warmup_lr": 1e-4,
    "warmup_epochs": 1,
    "weight_decay": 0.05,
    "aa": None,
    "reprob": 0.0,
    "hflip": 0.0,  # digits are not mirror-symmetric
    "color_jitter": 0.0,
    "scale": [0.7, 1.0],
    "ratio": [0.85, 1.15],
    "mixup": 0.0,
    "cutmix": 0.0,
    "smoothing": 0.1,
    "ema": True,
    "ema_decay": 0.99,
    "amp": "none",  # bf16 autocast is several times slower than fp32 on most CPUs
    "workers": 0,
    "output": "runs",
}


def _unknown_key_error(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(_FIELDS), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(_FIELDS))}"
    return ConfigError(f"unknown config key '{key}' in {where}{hint}")


def load_config(path: str | Path) -> Dict[str, Any]:
    """Reads a YAML recipe into a dict of known keys (raises :class:`ConfigError` otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    for key in data:
        if key not in _FIELDS:
            raise _unknown_key_error(str(key), str(path))
    return data


def _parse_value(text: str) -> Any:
    # flags are parsed as YAML scalars/lists so "null", "0.1", "[0.08, 1.0]" or "{a: 1}" all work
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:  # argparse turns this into "argument --x: ..." and exit code 2
        first = str(err).splitlines()[0]
        raise argparse.ArgumentTypeError(f"{text!r} is not a YAML value ({first})") from err


def _default_help(name: str, f: dataclasses.Field) -> str:
    generic = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if name in DIGITS_PRESET and DIGITS_PRESET[name] != generic:
        return f"default: {DIGITS_PRESET[name]} [with --config/--data-dir: {generic}]"
    return f"default: {generic}"


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train or evaluate a zoo/timm backbone on ImageNet-style data (or the embedded digits set). "
        "Every config key is a flag; values are read as YAML (null, 1e-3, [0.08, 1.0], {depth: 12}). "
        "Without --config and --data-dir the embedded digits default (configs/digits_test_vim.yaml) runs; "
        "the defaults shown are that bare run's, with the generic default used under --config/--data-dir "
        "in brackets where it differs.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("-c", "--config", default=None, help="YAML recipe (see configs/); flags override it")
    parser.add_argument("--eval", dest="eval_only", action="store_true",
                        help="only evaluate (the --resume or --finetune checkpoint) and print top-1/top-5")
    for name, f in _FIELDS.items():
        if name == "eval_only":
            continue
        flag = "--" + name.replace("_", "-")
        text = _default_help(name, f)
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(flag, dest=name, type=_parse_value, metavar=name.upper(), help=text)
    return parser


def _coerce(name: str, value: Any) -> Any:
    kind = str(_FIELDS[name].type)
    if value is None:
        if not kind.startswith("Optional"):
            raise ConfigError(f"config key '{name}' may not be null")
        return None
    try:
        if "float" in kind and "List" not in kind:
            return float(value)
        if "int" in kind and "List" not in kind and "float" not in kind:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if "str" in kind and "Dict" not in kind:
            return str(value)
        if "List[float]" in kind:
            return [float(v) for v in value]
        if "bool" in kind:
            if not isinstance(value, bool):
                raise ValueError
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key '{name}'={value!r} does not fit its type {kind}") from err
    return value


def config_from_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Defaults, then the ``--config`` recipe, then explicit flags."""
    args = vars(build_arg_parser().parse_args(argv))
    values: Dict[str, Any] = {}
    config_path = args.pop("config", None)
    if config_path:
        values.update(load_config(config_path))
    elif args.get("data_dir") is None and not args.get("dataset"):
        values.update(DIGITS_PRESET)
    values.update(args)
    return make_config(values)


def make_config(values: Dict[str, Any]) -> TrainConfig:
    """A validated :class:`TrainConfig` from a mapping of (a subset of) keys."""
    for key in values:
        if key not in _FIELDS:
            raise _unknown_key_error(key, "the given values")
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    return cfg.validate()


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
