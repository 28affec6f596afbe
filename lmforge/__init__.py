"""lmforge: from raw text to a working language model and back out.

The public Python API (text in, text out at this edge; token ids inside):

    import lmforge
    model, tok = lmforge.load("runs/quickstart")          # a run dir (or a converted HF dir)
    print(lmforge.generate(model, tok, "ROMEO:", max_new_tokens=50))
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import lmforge` must not import torch
    if name in ("load", "generate"):
        from lmforge import api

        return getattr(api, name)
    if name in ("Trainer",):
        from lmforge.train.trainer import Trainer

        return Trainer
    if name in ("load_config", "RunConfig", "ModelConfig", "TrainConfig", "DataConfig", "GenerateConfig"):
        from lmforge import config

        return getattr(config, name)
    raise AttributeError(name)
