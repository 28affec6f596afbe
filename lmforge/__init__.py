"""lmforge: from raw text to a working language model and back out.

The public Python API (text in, text out at this edge; token ids inside):

    import lmforge
    model, tok = lmforge.load("runs/quickstart/run")      # a run dir (or a Hugging Face folder)
    print(lmforge.generate(model, tok, "ROMEO:", max_new_tokens=50))
"""

import sys
import types

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import lmforge` must not import torch
    if name == "load":
        from lmforge import api

        return api.load
    if name in ("Trainer",):
        from lmforge.train.trainer import Trainer

        return Trainer
    if name in ("load_config", "RunConfig", "ModelConfig", "TrainConfig", "DataConfig", "GenerateConfig"):
        from lmforge import config

        return getattr(config, name)
    raise AttributeError(name)


class _Package(types.ModuleType):
    """`lmforge.generate` is the text-in, text-out function (api.generate), also once the submodule
    lmforge/generate.py is imported: importing a submodule sets the package attribute of its name, which
    this property absorbs. The submodule stays at `from lmforge.generate import ...`."""

    @property
    def generate(self):
        from lmforge.api import generate

        return generate

    @generate.setter
    def generate(self, submodule) -> None:
        pass


sys.modules[__name__].__class__ = _Package
