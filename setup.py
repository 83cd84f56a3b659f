"""Installs the zoo package.

A plain ``pip install -e .`` never compiles anything: the selective-scan kernels in ``csrc/`` are
built just in time on first use (see ``zoo/ops``). Set ``ZOO_BUILD_EXT=1`` to build them ahead of
time instead (needs a C++ compiler, and nvcc for the CUDA kernels).
"""
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
# the spellings zoo.ops._build.env_flag accepts (zoo itself is not importable before torch is installed)
if os.environ.get("ZOO_BUILD_EXT", "").strip().lower() in ("1", "true", "yes", "on"):
    from zoo_build import ahead_of_time_extensions  # noqa: E402  (needs torch at build time)

    ext_modules, cmdclass = ahead_of_time_extensions()

setup(
    name="zoo",
    version="0.1.0",
    description="Vision backbones (Vim, MSVMamba, ConvLLaVA, timm families) as first-class timm models",
    packages=find_packages(include=["zoo", "zoo.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "timm>=1.0.31",
        "einops",
        "safetensors",
        "pyyaml",
        "tqdm",
        "scikit-learn",  # the embedded digits data set of train_imagenet.py's default run
    ],
    extras_require={
        "test": [
            "pytest",
            "scikit-image>=0.26",
            "transformers>=5.23,<6",
            "open_clip_torch>=3.3,<4",
            "ninja",
            "datasets>=4",  # train_imagenet.py --dataset hfds (tests/test_train_datasets.py)
            "webdataset>=0.2",  # train_imagenet.py --dataset wds
            "onnx",  # tests/test_onnx.py: torch.onnx.export(dynamo=True) + onnxruntime round trips
            "onnxscript",
            "onnxruntime",
        ],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
