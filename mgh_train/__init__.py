"""mgh_train: everything above the kernels (trainer, synthesizer, evaluation, command line).

It reaches kernels only through ``mgh_kernels``' public functions.
"""

__version__ = "0.1.0"
