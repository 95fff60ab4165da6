"""Where the model this project trains and ships lives (see assets/tinychat/MODEL_CARD.md)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODEL_DIR = REPO_ROOT / "assets" / "tinychat"


def shipped_model_dir() -> Path:
    """The shipped model's directory; FileNotFoundError with the expected path if absent."""
    if not (SHIPPED_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the shipped model is missing: expected {SHIPPED_MODEL_DIR}/model.safetensors "
            "(a clean clone has it; see the README to retrain it)"
        )
    return SHIPPED_MODEL_DIR
