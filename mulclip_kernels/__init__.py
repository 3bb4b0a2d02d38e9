"""mulclip-kernels: fused, memory-lean ops for MulCLIP's word and subcaption level alignment.

    from mulclip_kernels import subcaption_patch_align, word_patch_reconstruction_loss

Every op takes `backend=` ("auto", "reference", "torch", and the fused backends installed);
`mulclip_kernels.reference` is the literal eager definition that every backend is tested against.
"""
from .dispatch import available_backends, backends, load_backends
from .losses import clip_loss, gather_batch, subcaption_alignment_loss
from .subcaption_patch import subcaption_patch_align, subcaption_patch_scores
from .word_patch import word_patch_reconstruction_loss

load_backends()

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "backends",
    "clip_loss",
    "gather_batch",
    "subcaption_alignment_loss",
    "subcaption_patch_align",
    "subcaption_patch_scores",
    "word_patch_reconstruction_loss",
]
