"""kd_jax: knowledge distillation in JAX/Flax.

`pip install .` installs the one package `kd_jax`; the repository's experiments/ (the CLIs and the shipped
table configs) travel inside it as `kd_jax.experiments`, so `kd-jax train hinton_mnist` works from any
directory while `python -m experiments.main` keeps working from a checkout. tests/ and third_party/ (the
PyTorch oracles of the parity tests) stay in the repository.
"""
import setuptools

setuptools.setup(
    name="kd_jax",
    version="0.1.0",
    description="Knowledge distillation in JAX/Flax: losses, model zoo, sharded training, paper reproductions.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author="kd_jax developers",
    url="https://github.com/kd-jax/kd_jax",
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=setuptools.find_packages(include=["kd_jax", "kd_jax.*"])
    + ["kd_jax.experiments", "kd_jax.experiments.configs"],
    package_dir={"kd_jax.experiments": "experiments"},
    entry_points={"console_scripts": ["kd-jax = kd_jax.cli:main"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.9",
        "etils[epath]>=1.5",  # kd_jax.train.files: workdirs on local disks and gs://
        "tensorflow-datasets>=4.9",
        "importlib_resources>=5",  # TFDS imports it to download and prepare datasets
        "tensorboardX>=2.6",  # kd_jax/train/summaries.py: TensorBoard event files without TensorFlow
        "chex>=0.1.87",
        "ml_collections>=0.1.1",
        "absl-py>=2.0",
        "tqdm>=4.60",
        "numpy>=1.26",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",  # experiments/reproduce.py plots
    ],
    extras_require={
        # gcp-storage-emulator serves gs:// on 127.0.0.1 for tests/test_files.py.
        "test": ["pytest>=7", "pytest-xdist>=3", "gcsfs", "gcp-storage-emulator"],
        # Workdirs on Cloud Storage (etils.epath reads gs:// through gcsfs when TensorFlow is absent).
        "gcs": ["gcsfs"],
        # Reference implementations for parity tests and benchmarks. torchdistill's
        # own requirements (torchvision, ...) are not needed by the adapters:
        # `make test` installs it with --no-deps.
        "compare": ["torch", "torchdistill"],
    },
)
