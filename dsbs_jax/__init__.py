"""dsbs-jax: distilling step-by-step (Hsieh et al., ACL 2023) in JAX/Flax.

This package holds the library; SeqIO registrations live in the top-level `tasks`
package, and `dsbs_jax.resources` locates the shipped gin configs and teacher rationales
(the repository's `gin/` and `rationales/`, or their copies in an installed wheel).
"""

__version__ = "0.1.0"
