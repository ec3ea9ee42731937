"""Shipped profile presets (`profile.<name>.yaml`); loaded by sandboxer.profiles."""

from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent
