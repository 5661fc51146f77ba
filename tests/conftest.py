"""Shared test setup: the Hugging Face Hub is unreachable here, so every test runs offline, and every test sees the
same terminal whatever the caller's environment (NO_COLOR, TERM=dumb, COLUMNS...): tests pin their own console."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

# Rich, Typer and click read these when a console is made (after this file runs): a caller's NO_COLOR=1, TERM=dumb
# or narrow COLUMNS must not change what the tests see. A test that needs one of them sets it itself.
for _name in ("NO_COLOR", "FORCE_COLOR", "CLICOLOR", "CLICOLOR_FORCE", "TTY_COMPATIBLE", "TTY_INTERACTIVE",
              "TERMINAL_WIDTH", "_TYPER_FORCE_DISABLE_TERMINAL", "LINES", "JUPYTER_COLUMNS", "JUPYTER_LINES"):
    os.environ.pop(_name, None)
os.environ["TERM"] = "xterm-256color"
os.environ["COLUMNS"] = "80"

# A private Hub cache (never the caller's): the tiny tokenizer under the Hub ids upstream nanoVLM configs name.
import atexit
import shutil
import tempfile
from pathlib import Path

from hub_cache import make_hub_cache

_HUB_CACHE = Path(tempfile.mkdtemp(prefix="nanovlm-hub-cache-"))
atexit.register(shutil.rmtree, _HUB_CACHE, True)
os.environ["HF_HUB_CACHE"] = str(make_hub_cache(_HUB_CACHE))
