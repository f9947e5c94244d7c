"""lr_tutorial: Layout-and-Retouch (arXiv 2407.09779), implemented and taught in notebooks.

    from lr_tutorial import load_models
    bundle = load_models("toy")       # ShapeWorld models of Stable Diffusion's architecture

Importing the package touches no network and loads no weights.
"""
__version__ = "0.1.0"

from .models import ModelBundle, load_models  # noqa: E402,F401
