import os
import subprocess

import pytest

# Triton kernels run in the interpreter on CPU; must be set before any @triton.jit runs.
# (The repo root is on sys.path through pyproject.toml's pytest `pythonpath`, and the packages are
# installed by `pip install -e .` in scripts/setup.sh.)
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    """One ``python app.py`` for every real-browser test (each test opens its own pages, so its own
    sessions): (url, process, log path). Starting it once instead of per module saves ~15 s a module."""
    from tests.test_app_browser import CHROMEDRIVER, CHROMIUM, _free_port, _have_browser, start_app

    if not _have_browser():
        pytest.fail(f"needs Debian chromium + chromedriver ({CHROMIUM}, {CHROMEDRIVER}); scripts/setup.sh installs them")
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    proc = start_app(port, log)
    yield f"http://127.0.0.1:{port}/", proc, log
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
