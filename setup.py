"""kd_jax: knowledge distillation in JAX/Flax."""
import setuptools

setuptools.setup(
    name="kd_jax",
    version="0.1.0",
    description="Knowledge distillation in JAX/Flax: losses, model zoo, sharded training, paper reproductions.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["kd_jax", "kd_jax.*", "experiments", "experiments.*", "third_party", "third_party.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.9",
        "etils[epath]>=1.5",  # kd_jax.train.files: workdirs on local disks and gs://
        "tensorflow-datasets>=4.9",
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
