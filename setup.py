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
    "absl-py>=2.1",
    "numpy>=2.0",
]

EXTRAS = {
    # Building the MovieLens data set: TFDS ArrayRecord builders, poster decoding, WordPiece.
    "data": [
        "tensorflow-datasets==4.9.10",
        "tensorflow-cpu==2.21.0",
        "importlib_resources>=6",
        "pillow>=10",
        "tokenizers==0.23.3",
    ],
    # Importing Hugging Face checkpoints (safetensors are read directly, no transformers needed).
    "convert": ["safetensors==0.8.0"],
    # Tests and benchmarks; torch/transformers only as the reference for converter tests.
    "dev": [
        "pytest==9.0.3",
        "torch==2.13.0",
        "transformers==5.24.0",
        "matplotlib>=3.8",
    ],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

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
