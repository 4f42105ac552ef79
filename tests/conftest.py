import os

# Triton kernels run in the interpreter on CPU; must be set before any @triton.jit runs.
# (The repo root is on sys.path through pyproject.toml's pytest `pythonpath`, and the packages are
# installed by `pip install -e .` in scripts/setup.sh.)
os.environ.setdefault("TRITON_INTERPRET", "1")
