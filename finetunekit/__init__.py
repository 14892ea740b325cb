"""finetunekit: tested building blocks for fine-tuning pretrained models.

Example:
    >>> import finetunekit as ftk
    >>> ftk.replace_head(model, 5)
    >>> ftk.freeze_to(model, -1)                       # train the head only
    >>> ftk.freeze_to(model, -3)                       # then the top two groups and the head
    >>> optimizer = torch.optim.AdamW(ftk.param_groups(model, lr=slice(1e-5, 1e-3)))
"""

from .callbacks import Callback, EarlyStopping
from .checkpoint import load_pretrained
from .errors import (
    FinetuneKitError,
    FinetuneKitWarning,
    HeadNotFoundError,
    NoMatchingTargetError,
    NoParametersError,
)
from .export import export_model
from .feature_cache import CacheMode, FeatureCache, build_feature_cache
from .freezing import FreezeSummary, Target, freeze, freeze_to, frozen, unfreeze
from .groups import LayerGroup, Split, layer_groups
from .heads import TokenPooler, find_head, replace_head
from .hf_callback import PhaseScheduleCallback
from .history import History
from .lora import (
    LoraTarget,
    add_lora,
    enable_gradient_checkpointing,
    load_adapter,
    lora_groups,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from .lr_finder import LRFinderResult, lr_find
from .optim_state import OptimizerCheck, check_optimizer, load_optimizer_state_dict, optimizer_state_dict
from .param_groups import NoDecayRule, ParamGroup, is_no_decay, layer_lrs, param_groups
from .policies import (
    BitFit,
    FeatureExtraction,
    FullFineTuning,
    GradualUnfreezing,
    LinearProbeThenFinetune,
    PartialFineTuning,
    ProgressiveFreezing,
    ReinitializeTop,
    SurgicalFineTuning,
)
from .report import Report, describe
from .schedules import one_cycle, slanted_triangular, warmup_schedule
from .trainer import Phase, Trainer, accuracy
from .trainer_checkpoint import CheckpointMismatchError

__version__ = "0.1.0"

__all__ = [
    "BitFit",
    "CacheMode",
    "Callback",
    "CheckpointMismatchError",
    "EarlyStopping",
    "FeatureCache",
    "FeatureExtraction",
    "FinetuneKitError",
    "FinetuneKitWarning",
    "FreezeSummary",
    "FullFineTuning",
    "GradualUnfreezing",
    "HeadNotFoundError",
    "History",
    "LRFinderResult",
    "LayerGroup",
    "LinearProbeThenFinetune",
    "LoraTarget",
    "NoDecayRule",
    "NoMatchingTargetError",
    "NoParametersError",
    "OptimizerCheck",
    "ParamGroup",
    "PartialFineTuning",
    "Phase",
    "PhaseScheduleCallback",
    "ProgressiveFreezing",
    "ReinitializeTop",
    "Report",
    "Split",
    "SurgicalFineTuning",
    "Target",
    "TokenPooler",
    "Trainer",
    "accuracy",
    "add_lora",
    "build_feature_cache",
    "check_optimizer",
    "describe",
    "enable_gradient_checkpointing",
    "export_model",
    "find_head",
    "freeze",
    "freeze_to",
    "frozen",
    "is_no_decay",
    "layer_groups",
    "layer_lrs",
    "load_adapter",
    "load_optimizer_state_dict",
    "load_pretrained",
    "lora_groups",
    "lr_find",
    "merge_lora",
    "one_cycle",
    "optimizer_state_dict",
    "param_groups",
    "replace_head",
    "save_adapter",
    "slanted_triangular",
    "unfreeze",
    "unmerge_lora",
    "warmup_schedule",
]
