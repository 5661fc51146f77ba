"""Shared test setup: the Hugging Face Hub is unreachable here, so every test runs offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
