"""The optimizer tests run the Triton kernels (``fused="triton"``) on CPU tensors through Triton's interpreter.

``TRITON_INTERPRET`` must be set before the kernels are first built (koala_hf.optim.triton_kernels), and the
two-process tests' workers inherit it from here.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
