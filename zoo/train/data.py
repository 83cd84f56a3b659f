"""Datasets, transforms, samplers and loaders.

Augmentation randomness is a pure function of (seed, epoch, position of the sample in the epoch's global
order): every sample's transform runs under its own seed. The images a step sees are therefore the same
whatever the number of workers or processes, and a run resumed in the middle of an epoch continues with
exactly the images (and crops) the uninterrupted run would have used.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from timm.data import create_transform
from timm.data.distributed_sampler import RepeatAugSampler

from .config import ConfigError, TrainConfig, TrainingError

__all__ = [
    "DigitsDataset",
    "SeededTransformDataset",
    "EpochSampler",
    "build_datasets",
    "build_loader",
    "DataBundle",
    "CheckedImages",
    "CorruptImageError",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 handwritten digits (1797 real scans, 10 classes) as RGB PIL images.

    A fixed stratified split keeps every 6th image of each class for validation (about 300 images).
    The 17 grey levels are stretched to 0..255; the 8 px images are upscaled by the transforms.
    """

    num_classes = 10

    def __init__(self, split: str = "train"):
        if split not in ("train", "val"):
            raise ValueError(f"digits split must be 'train' or 'val', got {split!r}")
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the embedded default data set needs scikit-learn (pip install scikit-learn), "
                "or pass --data-dir pointing at an ImageFolder with train/ and val/"
            ) from err
        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
        targets = digits.target.astype(np.int64)
        keep = []
        seen: Dict[int, int] = {}
        for i, t in enumerate(targets):
            n = seen.get(int(t), 0)
            seen[int(t)] = n + 1
            if (n % 6 == 5) == (split == "val"):
                keep.append(i)
        self.images = images[keep]
        self.targets = targets[keep].tolist()
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        img = Image.fromarray(self.images[index], mode="L").convert("RGB")
        return img, self.targets[index]


class CorruptImageError(TrainingError):
    """An image could not be read; the message names it."""


class CheckedImages(Dataset):
    """Reads ``base[index]`` and names the sample when its image cannot be decoded.

    With ``skip`` an unreadable sample is replaced by the next readable one (a warning per file, once), so a
    few broken files in a large set do not end a run; the replacement is deterministic, so exact resume
    still holds.
    """

    def __init__(self, base: Dataset, describe: Callable[[int], str], skip: bool = False):
        self.base = base
        self.describe = describe
        self.skip = skip
        self._warned: set = set()

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str) -> Any:  # classes, targets, samples... of the wrapped set
        if name in ("base", "describe", "skip", "_warned"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, index: int):
        n = len(self.base)
        for attempt in range(min(n, 64)):
            i = (index + attempt) % n
            try:
                return self.base[i]
            except (OSError, SyntaxError, ValueError) as err:  # PIL raises all three for broken files
                what = self.describe(i)
                if not self.skip:
                    raise CorruptImageError(f"cannot read image {what}: {err}; remove or replace it, or pass "
                                            "--skip-corrupt to train past unreadable images") from err
                if i not in self._warned:
                    self._warned.add(i)
                    print(f"[data] skipping unreadable image {what}: {err}", file=sys.stderr, flush=True)
        raise CorruptImageError(f"64 images in a row from {self.describe(index)} on cannot be read")


def _image_folder(root: Path, split: str, skip_corrupt: bool) -> Dataset:
    from torchvision.datasets import ImageFolder

    path = root / split
    if not path.is_dir():
        raise ConfigError(
            f"data path {path} does not exist: --data-dir must be an ImageFolder root holding "
            f"'{split}/<class>/<image>' folders"
        )
    try:
        ds = ImageFolder(str(path), transform=None)
    except (FileNotFoundError, RuntimeError) as err:
        raise ConfigError(f"data path {path} holds no images in class folders ({err})") from err
    if len(ds) == 0:
        raise ConfigError(f"data path {path} is empty: expected images under {path}/<class>/")
    return CheckedImages(ds, lambda i: ds.samples[i][0], skip_corrupt)


def _check_same_classes(train: List[str], val: List[str], where_train: str, where_val: str) -> None:
    if list(train) == list(val):
        return
    only_train = sorted(set(train) - set(val))
    only_val = sorted(set(val) - set(train))
    detail = []
    if only_train:
        detail.append(f"only in {where_train}: {only_train[:10]}{' ...' if len(only_train) > 10 else ''}")
    if only_val:
        detail.append(f"only in {where_val}: {only_val[:10]}{' ...' if len(only_val) > 10 else ''}")
    if not detail:
        detail.append("same names in a different order")
    raise ConfigError(f"{where_train} and {where_val} have different classes ({len(train)} vs {len(val)}; "
                      + "; ".join(detail) + "): the labels would not mean the same thing")


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    class_names: List[str]


def _hf_dataset(cfg: TrainConfig, split: str) -> Dataset:
    """A Hugging Face dataset through timm's reader (``hfds/NAME`` with ``--data-dir`` as its cache, or
    ``hfds`` alone with ``--data-dir`` a local dataset folder, e.g. parquet shards ``train-*.parquet``)."""
    from timm.data import create_dataset

    name = cfg.dataset.partition("/")[2]
    root = cfg.data_dir
    if not name:
        if not cfg.data_dir:
            raise ConfigError("--dataset hfds needs --data-dir (a local dataset folder) or a name: hfds/NAME")
        name, root = str(Path(cfg.data_dir).expanduser()), None
    try:
        ds = create_dataset(f"hfds/{name}", root=root, split=split, is_training=False)
    except ImportError as err:
        raise ConfigError(f"--dataset {cfg.dataset} needs the Hugging Face datasets package "
                          "(pip install datasets)") from err
    except (ValueError, FileNotFoundError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--dataset {cfg.dataset}: cannot load split '{split}' of {name}: {first}") from err
    return CheckedImages(ds, lambda i: f"sample {i} of {name} [{split}]", cfg.skip_corrupt)


def is_streaming(cfg: TrainConfig) -> bool:
    """WebDataset shards are read as a stream (timm's IterableImageDataset), not by index."""
    return cfg.dataset.partition("/")[0].lower() == "wds"


def _wds_dataset(cfg: TrainConfig, split: str, is_training: bool, batch_size: int) -> Dataset:
    """WebDataset shards through timm's reader: shard shuffling and per-rank / per-worker splits by timm,
    the length from ``_info.json`` or the split's ``|N`` suffix."""
    from timm.data import create_dataset

    if not cfg.data_dir:
        raise ConfigError("--dataset wds needs --data-dir, the folder holding the tar shards")
    try:
        return create_dataset(cfg.dataset if "/" in cfg.dataset else "wds/", root=str(Path(cfg.data_dir).expanduser()),
                              split=split, is_training=is_training, batch_size=batch_size, seed=cfg.seed)
    except ImportError as err:
        raise ConfigError("--dataset wds needs the webdataset package (pip install webdataset)") from err
    except (RuntimeError, ValueError, KeyError, FileNotFoundError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--dataset {cfg.dataset}: cannot read split {split!r} in {cfg.data_dir}: {first} "
                          "(give the shards as 'NAME-{000000..000009}.tar|NUM_SAMPLES' or write an "
                          "_info.json)") from err


def build_streaming_datasets(cfg: TrainConfig, micro_batch: int, world_size: int) -> DataBundle:
    train = _wds_dataset(cfg, cfg.train_split, True, micro_batch)
    val = _wds_dataset(cfg, cfg.val_split, False, micro_batch)
    info = getattr(train.reader, "info", {}) or {}
    num_classes = cfg.num_classes or info.get("num_classes")
    if not num_classes:
        raise ConfigError("--dataset wds: the number of classes is not in _info.json ('num_classes'); "
                          "pass --num-classes N")
    return DataBundle(train, val, int(num_classes), [str(c) for c in range(int(num_classes))])


def _class_names(ds: Dataset) -> List[str]:
    classes = getattr(ds, "classes", None)
    if classes is not None:
        return list(classes)
    mapping = ds.reader.class_to_idx  # timm readers
    return [name for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])]


def build_datasets(cfg: TrainConfig) -> DataBundle:
    """The training and validation sets, untransformed (PIL image, label)."""
    kind = cfg.dataset.partition("/")[0].lower()
    if kind == "wds":
        raise ConfigError("WebDataset shards are streamed: use build_streaming_datasets")
    if kind == "hfds":
        train, val = _hf_dataset(cfg, cfg.train_split), _hf_dataset(cfg, cfg.val_split)
        names_train, names_val = _class_names(train), _class_names(val)
        _check_same_classes(names_train, names_val, f"{cfg.dataset} [{cfg.train_split}]",
                            f"{cfg.dataset} [{cfg.val_split}]")
        return DataBundle(train, val, len(names_train), names_train)
    if kind not in ("", "folder", "imagefolder"):
        raise ConfigError(f"config key 'dataset'={cfg.dataset!r}: accepted are '' or folder (an ImageFolder "
                          "tree), hfds/NAME or hfds (with --data-dir a local Hugging Face dataset folder), wds (tar shards in "
                          "--data-dir)")
    if cfg.data_dir is None:
        train, val = DigitsDataset("train"), DigitsDataset("val")
        return DataBundle(train, val, DigitsDataset.num_classes, train.classes)
    root = Path(cfg.data_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--data-dir {root} does not exist (expected an ImageFolder root with train/ and val/)")
    train = _image_folder(root, cfg.train_split, cfg.skip_corrupt)
    val = _image_folder(root, cfg.val_split, cfg.skip_corrupt)
    _check_same_classes(train.classes, val.classes, f"{root}/{cfg.train_split}", f"{root}/{cfg.val_split}")
    return DataBundle(train, val, len(train.classes), list(train.classes))


def _posterize_allow_zero(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    # keeping 0 bits blacks the image out (what Pillow < 11 did); Pillow >= 11 raises for bits < 1
    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _patch_zero_bit_posterize(transform: Any) -> None:
    """timm's RandAugment ("inc1" policies at magnitude 10) asks Pillow to keep 0 bits, which current Pillow
    rejects. Swap the op's function in this transform instance only (timm itself is left untouched)."""
    from timm.data import auto_augment

    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize_allow_zero


def build_transforms(cfg: TrainConfig, data_config: Dict[str, Any]) -> Tuple[Callable, Callable]:
    """timm's train / eval transforms for the model's data config (input size, mean/std, crop pct)."""
    train_tf = create_transform(
        input_size=data_config["input_size"],
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.aa,
        interpolation=cfg.train_interpolation,
        mean=data_config["mean"],
        std=data_config["std"],
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=cfg.recount,
    )
    _patch_zero_bit_posterize(train_tf)
    eval_tf = create_transform(
        input_size=data_config["input_size"],
        is_training=False,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        crop_pct=data_config["crop_pct"],
    )
    return train_tf, eval_tf


def _sample_seed(seed: int, epoch: int, position: int) -> int:
    # a cheap integer mix; distinct (seed, epoch, position) give unrelated streams
    x = (seed * 0x9E3779B1 + epoch * 0x85EBCA77 + position * 0xC2B2AE3D) & 0xFFFFFFFFFFFF
    x ^= x >> 17
    x = (x * 0x2545F491) & 0xFFFFFFFF
    return x


class SeededTransformDataset(Dataset):
    """Applies ``transform`` to ``base[index]`` under a per-sample seed given by :class:`EpochSampler`.

    Indices are ``(index, seed)`` pairs (or plain ints: no reseeding, for evaluation). The global random
    state of the calling process is restored afterwards, so with ``workers=0`` the model's own randomness
    (drop path, mixup) is untouched by data loading.
    """

    def __init__(self, base: Dataset, transform: Callable):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            index, seed = item
            py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            try:
                img, target = self.base[index]
                return self.transform(img), target
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
                torch.set_rng_state(torch_state)
        img, target = self.base[item]
        return self.transform(img), target


class EpochSampler(Sampler):
    """Wraps a per-rank sampler; yields ``(index, seed)`` and can start part-way into an epoch.

    The seed depends on the sample's position in the epoch's global order (local position * world + rank,
    the interleaving used by DistributedSampler and RepeatAugSampler), so one process with batch B and
    W processes with batch B/W see the same images under the same augmentation.
    """

    def __init__(self, inner: Sampler, seed: int, rank: int, world_size: int, inner_epoch_offset: int = 0):
        self.inner = inner
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0  # local samples to skip (resume inside an epoch)
        self.inner_epoch_offset = inner_epoch_offset  # for inner samplers that shuffle by the epoch alone

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch + self.inner_epoch_offset)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for pos, index in enumerate(self.inner):
            if pos < self.start:
                continue
            yield int(index), _sample_seed(self.seed, self.epoch, pos * self.world_size + self.rank)

    def __len__(self) -> int:
        return len(self.inner) - self.start


class ShardSampler(Sampler):
    """Evaluation sharding without padding: rank r takes every world_size-th image from r.

    Unlike DistributedSampler it never repeats images, so summed counts over ranks are exact.
    """

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_train_sampler(dataset: Dataset, cfg: TrainConfig, rank: int, world_size: int) -> EpochSampler:
    if cfg.repeated_aug > 1:
        inner: Sampler = RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                          num_repeats=cfg.repeated_aug)
        # timm's RepeatAugSampler shuffles with the epoch number as its only seed; shift it by the run's seed
        # so that different seeds see different orders (epochs stay far below the 1_000_003 stride)
        return EpochSampler(inner, cfg.seed, rank, world_size, inner_epoch_offset=cfg.seed * 1_000_003)
    inner = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed,
                               drop_last=False)
    return EpochSampler(inner, cfg.seed, rank, world_size)


def _worker_init(worker_id: int) -> None:
    # keep each worker to one thread: the main process already uses the cores for compute
    torch.set_num_threads(1)


def build_loader(dataset: Dataset, sampler: Optional[Sampler], batch_size: int, cfg: TrainConfig, *, train: bool,
                 device: torch.device) -> DataLoader:
    workers = cfg.workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=cfg.pin_memory and device.type == "cuda",
        persistent_workers=cfg.persistent_workers and workers > 0,
        drop_last=train,
        worker_init_fn=_worker_init if workers > 0 else None,
        # a private generator: creating an epoch's iterator must not draw from the global torch RNG,
        # or a run resumed mid-epoch would drift from the uninterrupted one
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def steps_per_epoch(num_local_samples: int, micro_batch: int, accum_steps: int) -> int:
    """Optimizer steps in one epoch (incomplete micro-batches and accumulation groups are dropped)."""
    return (num_local_samples // micro_batch) // accum_steps
