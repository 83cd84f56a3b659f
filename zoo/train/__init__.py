"""Training engine behind ``train_imagenet.py``: config, data, optimisation, checkpoints, torchrun.

Typical use is the script; programmatic use::

    from zoo.train import make_config, run
    summary = run(make_config({"model": "test_vim", "epochs": 2, "global_batch_size": 64}))
"""
from .config import ConfigError, TrainConfig, TrainingError, build_arg_parser, config_from_args, load_config, make_config
from .engine import NonFiniteLossError
from .runner import run

__all__ = [
    "ConfigError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainingError",
    "build_arg_parser",
    "config_from_args",
    "load_config",
    "make_config",
    "run",
]
