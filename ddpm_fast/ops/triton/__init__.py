"""@triton.jit kernels and their launchers. Importing needs triton; callers check ``_ext.has_triton()``."""
