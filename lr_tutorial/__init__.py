"""lr_tutorial: Layout-and-Retouch (arXiv 2407.09779), implemented and taught in notebooks.

    from lr_tutorial import LayoutAndRetouch, load_models
    bundle = load_models("toy")       # ShapeWorld models of Stable Diffusion's architecture
    result = LayoutAndRetouch(bundle)("a sks star on the left in the snow", seed=0)

Importing the package touches no network and loads no weights. It registers the engines that
LRConfig.engine names: "reference" (lr_tutorial.pipeline) and "fast" (lr_tutorial.fast).
"""
from .version import __version__  # noqa: F401
from .models import ModelBundle, load_models  # noqa: E402,F401
from .pipeline import LayoutAndRetouch  # noqa: E402,F401
from .fast import pipeline as _fast  # noqa: E402,F401  (registers LRConfig(engine="fast"))
