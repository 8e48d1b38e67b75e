"""dsbs-jax: distilling step-by-step (Hsieh et al., ACL 2023) in JAX/Flax.

This package holds the library, one module per stage of the data's way (README, "The
pieces"); `dsbs_jax.datasets.register_all` registers the SeqIO tasks and mixtures (the
top-level `tasks` package calls it for T5X), and `dsbs_jax.resources` locates the shipped
gin configs and teacher rationales (the repository's `gin/` and `rationales/`, or their
copies in an installed wheel).
"""

__version__ = "0.1.0"
