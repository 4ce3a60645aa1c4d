"""fusedrl.engine.rewards: batched, optionally differentiable reward functions for RL post-training.

    from fusedrl.engine.rewards import load_reward
    reward = load_reward("pickscore", "/models/PickScore_v1", device="cuda", autocast_dtype=torch.bfloat16)
    scores = reward(images, prompts)          # images [B, 3, H, W] float in [0, 1]; scores float32 [B]

Image rewards (`ImageReward`): aesthetic, clip_score, pickscore, hpsv2, imagereward, brightness, target_color
(differentiable), jpeg_compressibility, jpeg_incompressibility (not). Text rewards (`TextReward`): numeric_answer,
exact_match, regex_format, sequence_classification. See base.py for the value-range contract and the batching,
combine.py for weighted / group-normalized / Pareto combinations of several rewards, worker.py for scoring in the
background.
Importing this package imports torch only; transformers is imported when a learned reward is loaded.
"""

from . import aesthetic, clip, hpsv2, imagereward, jpeg, simple, text  # noqa: F401  (registration)
from .aesthetic import AestheticMLP, AestheticReward
from .base import ImageReward, Reward, TextReward
from .clip import ClipReward
from .combine import CombinedReward, CombinedScores, LinearSchedule, pareto_mask
from .convert_open_clip import clip_config_from_open_clip, convert_open_clip_checkpoint, convert_open_clip_state_dict
from .function import FunctionReward  # noqa: F401
from .imagereward import (
    ImageRewardScore,
    convert_imagereward_checkpoint,
    convert_imagereward_state_dict,
    imagereward_config,
    imagereward_model_class,
    load_imagereward_checkpoint,
)
from .jpeg import JpegSize
from .preprocess import ClipPreprocess
from .registry import available_rewards, load_reward, register_reward
from .simple import Brightness, TargetColor
from .text import (
    ExactMatchReward,
    NumericAnswerReward,
    RegexFormatReward,
    SequenceClassifierReward,
    extract_final_answer,
    final_number,
)
from .worker import RewardFuture, RewardWorker, RewardWorkerError

__all__ = [
    "Brightness",
    "CombinedReward",
    "CombinedScores",
    "ImageRewardScore",
    "LinearSchedule",
    "RewardFuture",
    "RewardWorker",
    "RewardWorkerError",
    "TargetColor",
    "convert_imagereward_checkpoint",
    "convert_imagereward_state_dict",
    "imagereward_config",
    "imagereward_model_class",
    "load_imagereward_checkpoint",
    "pareto_mask",
    "AestheticMLP",
    "AestheticReward",
    "ClipPreprocess",
    "ClipReward",
    "ExactMatchReward",
    "ImageReward",
    "JpegSize",
    "NumericAnswerReward",
    "RegexFormatReward",
    "Reward",
    "SequenceClassifierReward",
    "TextReward",
    "available_rewards",
    "clip_config_from_open_clip",
    "convert_open_clip_checkpoint",
    "convert_open_clip_state_dict",
    "extract_final_answer",
    "final_number",
    "load_reward",
    "register_reward",
]
