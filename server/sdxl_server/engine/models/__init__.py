"""Models shipped inside the package: the trained demo SDXL (``--model demo``) and the world it draws."""

from pathlib import Path

# A diffusers-format Flax SDXL trained by tools/train_demo_model.py (see demo/world.json for how).
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo"
