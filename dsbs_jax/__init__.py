"""dsbs-jax: distilling step-by-step (Hsieh et al., ACL 2023) in JAX/Flax.

This package holds the library; SeqIO registrations live in the top-level `tasks`
package and the shipped teacher rationales in `rationales/`.
"""

__version__ = "0.1.0"
