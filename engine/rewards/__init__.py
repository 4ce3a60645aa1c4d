"""fusedrl.engine.rewards: batched, optionally differentiable reward functions for RL post-training.

    from fusedrl.engine.rewards import load_reward
    reward = load_reward("pickscore", "/models/PickScore_v1", device="cuda", autocast_dtype=torch.bfloat16)
    scores = reward(images, prompts)          # images [B, 3, H, W] float in [0, 1]; scores float32 [B]

Image rewards (`ImageReward`): aesthetic, clip_score, pickscore, hpsv2 (differentiable), jpeg_compressibility,
jpeg_incompressibility (not). Text rewards (`TextReward`): numeric_answer, exact_match, regex_format,
sequence_classification. See base.py for the value-range contract and the batching.
Importing this package imports torch only; transformers is imported when a learned reward is loaded.
"""

from . import aesthetic, clip, hpsv2, jpeg, text  # noqa: F401  (registration)
from .aesthetic import AestheticMLP, AestheticReward
from .base import ImageReward, Reward, TextReward
from .clip import ClipReward
from .convert_open_clip import clip_config_from_open_clip, convert_open_clip_checkpoint, convert_open_clip_state_dict
from .jpeg import JpegSize
from .preprocess import ClipPreprocess
from .registry import available_rewards, load_reward, register_reward
from .text import (
    ExactMatchReward,
    NumericAnswerReward,
    RegexFormatReward,
    SequenceClassifierReward,
    extract_final_answer,
    final_number,
)

__all__ = [
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
