"""mulclip: training and evaluation of MulCLIP models on open_clip, using mulclip_kernels."""
