import os
import sys

# Triton kernels run in the interpreter on CPU; must be set before any @triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
