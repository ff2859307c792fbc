"""train-baseline: the 3D residual U-Net of Tomita et al. 2020 (model, data, training loop, inference).

Needs the optional ``torch`` dependency (``pip install atlas-curate[train]``); importing this package imports
torch, so ``atlas_curate`` and its CLI import it only inside the commands that train or predict.
"""

from .config import StageConfig, TrainConfig, load_config, make_config, preset_config, save_config
from .loop import TrainResult, train

__all__ = ["StageConfig", "TrainConfig", "TrainResult", "load_config", "make_config", "preset_config",
           "save_config", "train"]
