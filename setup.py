"""RecFusion-JAX: multimodal recommendation with a unified Transformer encoder, in JAX/Flax NNX."""

from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml_collections==1.1.0",
    "clu==0.0.12",            # metric writers, progress reports (train loop)
    "tensorboard>=2.16",      # clu's summary writer imports it (TensorBoard event files)
    "absl-py>=2.1",
    "etils[epath]>=1.7",     # every run output and data path (local and gs:// alike)
    "numpy>=2.0",
]

# What each job installs (no job pulls torch/transformers: they are test references only):
#   main MovieLens job (launch/movielens.sh):  .[data,bench]     (+ convert for SIZE=base)
#   recommend / export from a workdir:         core (+ data for a new item's text or image)
#   serving an export directory:               jax and numpy only (recfusion_jax/serving.py)
#   tests:                                     .[data,bench,convert,test]  (= .[all])
EXTRAS = {
    # Building the MovieLens data set (TFDS ArrayRecord builders, poster decoding, WordPiece);
    # pillow and tokenizers also read a new item's image and text in the recommend CLI.
    "data": [
        "tensorflow-datasets==4.9.10",
        "tensorflow-cpu==2.21.0",
        "importlib_resources>=6",
        "pillow>=10",
        "tokenizers==0.23.3",
    ],
    # The benchmark runner's plots (RESULTS.md figures).
    "bench": ["matplotlib>=3.8"],
    # Importing Hugging Face checkpoints (safetensors are read directly, no transformers needed).
    "convert": ["safetensors==0.8.0"],
    # Tests: pytest, and torch/transformers as the reference implementations of the converter
    # tests (never imported by the library).
    "test": [
        "pytest==9.0.3",
        "pytest-xdist==3.8.0",   # the suite runs in 2 processes (-n 2), one test file each
        "fsspec>=2024.1",        # in-memory gs:// stand-in of tests/test_paths.py
        "torch==2.13.0",
        "transformers==5.24.0",
    ],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})
EXTRAS["dev"] = EXTRAS["all"]     # the former name of the test environment

setup(
    name="recfusion-jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    # The library only: configs/ and data_prep/ are top-level folders of the checkout (run
    # from the repository root), not packages to install under names like anybody's.
    packages=find_packages(include=["recfusion_jax", "recfusion_jax.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
)
