"""The `Reward` interface: image rewards score [B, 3, H, W] float tensors (with prompts), text rewards score
completions; both return a float32 [B] tensor and say whether gradients flow back to their input.

Image value range. Generators hand images over in [0, 1] (after `VaeImageProcessor.postprocess`) or in
[-1, 1] (straight out of the VAE decoder), and the two cannot be told apart from the values alone (an
image in [0, 1] is also in [-1, 1]). So the range is *declared*, never guessed: `value_range=(lo, hi)` on
the reward (default (0, 1)) or per call in `score(..., value_range=...)`; any (lo, hi) works, e.g.
(0, 255) for float images in 0..255. The images are mapped with (x - lo) / (hi - lo) and clamped to
[0, 1], as diffusers' postprocessing and DDPO / AlignProp do (pixels that the VAE pushes out of range get
no gradient, as there). The declaration is checked (one host sync per call, `check_range=False` skips it):
a value more than 25% of the range width outside (lo, hi) raises ValueError, which catches [-1, 1] images
declared as (0, 1) and 0..255 images declared as (0, 1) while tolerating VAE overshoot; NaN/inf raise too.
A batch declared (-1, 1) with no negative value warns once (it is probably in [0, 1]).
`value_range="auto"` opts into the heuristic: (-1, 1) when the batch has a negative value, else (0, 1).
"""

from __future__ import annotations

import abc
import contextlib
import math
import warnings
from collections.abc import Iterable, Sequence

import torch

RANGE_TOLERANCE = 0.25  # fraction of (hi - lo) that values may overshoot before the declaration is called wrong

ValueRange = tuple[float, float] | str

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def parse_value_range(value_range: ValueRange, name: str = "value_range") -> tuple[float, float] | str:
    """(lo, hi) as floats with lo < hi, or "auto"; anything else raises ValueError/TypeError naming `name`."""
    if isinstance(value_range, str):
        if value_range != "auto":
            raise ValueError(f"{name} must be a (lo, hi) pair such as (0, 1) or (-1, 1), or 'auto'; "
                             f"got {value_range!r}")
        return "auto"
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (lo, hi) pair of numbers or 'auto'; got {value_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{name} must satisfy lo < hi (both finite); got {value_range!r}")
    return lo, hi


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                   "float16": torch.float16, "half": torch.float16}


def autocast_dtype_of(value: torch.dtype | str | None) -> torch.dtype | None:
    """torch.bfloat16 / torch.float16 / None, also from their names ("bf16", "bfloat16", "fp16", "float16"): a
    config file or the trainers' reward.options can only spell a dtype as a string."""
    dtype = AUTOCAST_DTYPES.get(value.lower(), value) if isinstance(value, str) else value
    if dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"autocast_dtype must be None, bf16 or fp16 (or torch.bfloat16 / torch.float16); "
                         f"got {value!r}")
    return dtype


def check_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Checks that `images` is a floating [B, 3, H, W] tensor; returns it unchanged."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape [B, 3, H, W] (float, values in the declared value_range); "
            f"got {type(images).__name__} (convert PIL/numpy images with torchvision.transforms.functional.to_tensor "
            "or torch.from_numpy(...).permute(0, 3, 1, 2).float() / 255)"
        )
    if images.dim() != 4 or images.shape[1] != 3:
        hint = ""
        if images.dim() == 3 and images.shape[0] == 3:
            hint = " (a single image: use images.unsqueeze(0))"
        elif images.dim() == 4 and images.shape[-1] == 3:
            hint = " (channels last? use images.permute(0, 3, 1, 2))"
        raise ValueError(f"{name} must have shape [B, 3, H, W]; got {tuple(images.shape)}{hint}")
    if images.dtype not in _FLOAT_DTYPES:
        hint = ""
        if images.dtype == torch.uint8:
            hint = " (uint8 images: pass images.float() / 255 with value_range=(0, 1))"
        raise TypeError(f"{name} must be floating point (fp16, bf16, fp32 or fp64); got {images.dtype}{hint}")
    if images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"{name} must have H, W >= 1; got {tuple(images.shape)}")
    return images


def check_texts(texts: Sequence[str] | None, batch: int | None, name: str, required: bool) -> list[str] | None:
    """`texts` as a list of `batch` strings (any length when batch is None); None passes unless required."""
    if texts is None:
        if required:
            raise ValueError(f"{name} is required by this reward (one string per sample)")
        return None
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{name} must be a list or tuple of strings, one per sample; got {type(texts).__name__}")
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"{name}[{bad}] must be a str; got {type(texts[bad]).__name__}")
    if batch is not None and len(texts) != batch:
        raise ValueError(f"{name} has {len(texts)} entries but there are {batch} samples; give one per sample")
    return texts


def check_metadata(metadata: Sequence[dict] | None, batch: int) -> list[dict] | None:
    """`metadata` as a list of `batch` dicts (None passes)."""
    if metadata is None:
        return None
    if isinstance(metadata, (str, dict)) or not isinstance(metadata, Sequence):
        raise TypeError(f"metadata must be a list of dicts, one per sample; got {type(metadata).__name__}")
    metadata = list(metadata)
    bad = next((i for i, m in enumerate(metadata) if not isinstance(m, dict)), None)
    if bad is not None:
        raise TypeError(f"metadata[{bad}] must be a dict; got {type(metadata[bad]).__name__}")
    if len(metadata) != batch:
        raise ValueError(f"metadata has {len(metadata)} entries but there are {batch} samples; give one per sample")
    return metadata


def any_takes_metadata(rewards: Iterable[object]) -> bool:
    """Whether any of `rewards` takes the prompts' row fields (`ImageReward.takes_metadata`; plain callables do not)."""
    return any(getattr(r, "takes_metadata", False) for r in rewards)


class Reward(abc.ABC):
    """A reward function. `reward(...)` is `reward.score(...)`; the result is a float32 [B] tensor.

    Attributes:
        name: the registry name.
        modality: "image" (score(images, prompts)) or "text" (score(completions, prompts, answers)).
        differentiable: whether gradients reach the input (pixels) when it requires grad.
    """

    name: str = "reward"
    modality: str = ""
    differentiable: bool = False

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.score(*args, **kwargs)

    @abc.abstractmethod
    def score(self, *args, **kwargs) -> torch.Tensor:
        """float32 [B] scores."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, differentiable={self.differentiable})"


class ImageReward(Reward):
    """Base of rewards on images. Subclasses implement `_score_pixels(pixels, prompts) -> [b]`, where pixels
    is a [b, 3, H, W] float tensor in [0, 1] on `self.device` (or on the input's device when `self.device` is
    None) and prompts is None or b strings.

    `score` validates the inputs, maps the declared value range to [0, 1], cuts the batch into micro-batches
    of at most `max_batch_size` (fewer when `memory_budget_mb` and the subclass's per-image activation
    estimate say so), runs each under bf16/fp16 autocast when `autocast_dtype` is set, and concatenates.
    When no gradient is needed (the images do not require grad, grad mode is off, or the reward is not
    differentiable) the work runs under `torch.inference_mode()`; the returned tensor is a normal tensor
    (usable in autograd afterwards). With gradients, micro-batching bounds only the transient memory (every
    micro-batch's graph lives until backward).

    Args:
        value_range: the declared range of the images (module docstring), default (0, 1).
        max_batch_size: the largest micro-batch (>= 1).
        memory_budget_mb: if set, micro-batches are also capped at budget / `activation_bytes_per_image()`.
        autocast_dtype: torch.bfloat16 or torch.float16 (or "bf16" / "fp16") to run the model under
            torch.autocast; None: off.
        check_range: check the values against the declared range (one host sync per call).
        compile: run the scoring of each micro-batch through `torch.compile` (fuses the towers' norms,
            activations and residual adds around the matmuls). Each micro-batch size (and image size) compiles
            once, at its first call (tens of seconds); past torch's recompile limit (8) the rest run eager.
    """

    modality = "image"
    needs_prompts: bool = False
    takes_metadata: bool = False  # True: `_score_pixels` takes metadata= (one dict per image), e.g. FunctionReward
    device: torch.device | None = None

    def __init__(
        self,
        *,
        value_range: ValueRange = (0.0, 1.0),
        max_batch_size: int = 64,
        memory_budget_mb: float | None = None,
        autocast_dtype: torch.dtype | str | None = None,
        check_range: bool = True,
        compile: bool = False,
    ) -> None:
        self.value_range = parse_value_range(value_range)
        if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1; got {max_batch_size!r}")
        self.max_batch_size = max_batch_size
        if memory_budget_mb is not None and not memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb must be > 0 or None; got {memory_budget_mb!r}")
        self.memory_budget_mb = memory_budget_mb
        self.autocast_dtype = autocast_dtype_of(autocast_dtype)
        self.check_range = check_range
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False; got {compile!r}")
        self.compile = compile
        self._compiled = None
        self._warned_range = False

    # -- subclass hooks -------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        """[b, 3, H, W] in [0, 1] -> [b] scores."""

    def activation_bytes_per_image(self, grad: bool, height: int, width: int) -> int | None:
        """Rough peak activation bytes per image (None: unknown, memory_budget_mb is then ignored)."""
        return None

    # -- the public call ------------------------------------------------------------------------------------

    def score(
        self,
        images: torch.Tensor,
        prompts: Sequence[str] | None = None,
        *,
        value_range: ValueRange | None = None,
        metadata: Sequence[dict] | None = None,
    ) -> torch.Tensor:
        """Scores a batch of images.

        Args:
            images: [B, 3, H, W] floating tensor, values in the declared value range, on any device (moved to
                the reward's device for the model and the scores moved back).
            prompts: B strings (required by image-text rewards, checked for count by all).
            value_range: overrides the reward's declared range for this call.
            metadata: B dicts, each image's prompt fields beyond the prompt (e.g. a GenEval or OCR target), for
                rewards that take them (`takes_metadata`); the others ignore it.

        Returns:
            float32 [B] on images.device; differentiable w.r.t. images when `self.differentiable`, grad mode
            is on and images.requires_grad.
        """
        images = check_images(images)
        batch = images.shape[0]
        prompts = check_texts(prompts, batch, "prompts", required=self.needs_prompts)
        metadata = check_metadata(metadata, batch) if self.takes_metadata else None
        vr = self.value_range if value_range is None else parse_value_range(value_range)
        if batch == 0:
            return torch.zeros(0, dtype=torch.float32, device=images.device)
        lo, hi = self._resolve_range(images, vr)
        need_grad = self.differentiable and torch.is_grad_enabled() and images.requires_grad
        chunk = self.micro_batch_size(need_grad, images.shape[2], images.shape[3])
        with contextlib.nullcontext() if need_grad else torch.inference_mode():
            outs = []
            for start in range(0, batch, chunk):
                x = images[start:start + chunk]
                if self.device is not None:
                    x = x.to(self.device)
                x = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
                extra = {} if metadata is None else {"metadata": metadata[start:start + chunk]}
                with self._autocast(x.device):
                    out = self._scorer()(x, None if prompts is None else prompts[start:start + chunk], **extra)
                outs.append(out.float().reshape(-1))
            scores = torch.cat(outs).to(images.device)
        if scores.shape != (batch,):
            raise RuntimeError(f"{self.name}: produced scores of shape {tuple(scores.shape)} for {batch} images")
        return scores if need_grad else scores.clone()  # a normal tensor, not an inference tensor

    def micro_batch_size(self, grad: bool, height: int, width: int) -> int:
        """The micro-batch size `score` uses for images of this size."""
        size = self.max_batch_size
        if self.memory_budget_mb is not None:
            per_image = self.activation_bytes_per_image(grad, height, width)
            if per_image:
                size = min(size, max(1, int(self.memory_budget_mb * 2**20 // per_image)))
        return size

    # The method `compile` wraps: tensors in, tensors out. A reward that tokenizes prompts names its tensor-only
    # part (the image tower), since dynamo guards on Python strings and token ids: with the prompts inside, every
    # new prompt list recompiled (13 s each on a CPU) until torch's recompile limit, then ran eager.
    compile_target = "_score_pixels"

    def _scorer(self):
        """`_score_pixels`, with `compile_target` torch.compile'd (built at the first call) when `compile` is set."""
        if not self.compile:
            return self._score_pixels
        if self._compiled is None:
            # static shapes: one graph per micro-batch size (dynamic ones hit a torch bug in the backward of
            # antialiased bicubic resizing, and a GPU prefers static shapes anyway)
            self._compiled = torch.compile(getattr(self, self.compile_target), dynamic=False)
            if self.compile_target != "_score_pixels":
                setattr(self, self.compile_target, self._compiled)  # the instance's method, seen by _score_pixels
        return self._compiled if self.compile_target == "_score_pixels" else self._score_pixels

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def _resolve_range(self, images: torch.Tensor, vr: tuple[float, float] | str) -> tuple[float, float]:
        if not self.check_range:
            if vr == "auto":
                raise ValueError("value_range='auto' needs check_range=True (it looks at the values)")
            return vr
        with torch.no_grad():
            lo_v, hi_v = torch.stack([images.detach().amin(), images.detach().amax()]).float().tolist()
        if not (math.isfinite(lo_v) and math.isfinite(hi_v)):
            raise ValueError("images contain NaN or inf")
        if vr == "auto":
            vr = (-1.0, 1.0) if lo_v < 0 else (0.0, 1.0)
        lo, hi = vr
        slack = RANGE_TOLERANCE * (hi - lo)
        if lo_v < lo - slack or hi_v > hi + slack:
            raise ValueError(
                f"images have values in [{lo_v:.4g}, {hi_v:.4g}] but value_range is ({lo:g}, {hi:g}); declare the "
                "range the images are in, e.g. value_range=(-1, 1) for VAE-decoder output or (0, 1) after "
                "postprocessing (values may overshoot the range by at most 25% of its width)"
            )
        if lo == -1.0 and lo_v >= 0 and not self._warned_range:
            self._warned_range = True
            warnings.warn(
                f"{self.name}: images declared in (-1, 1) have no negative value; if they are in [0, 1], pass "
                "value_range=(0, 1)", stacklevel=3,
            )
        return lo, hi


class TextReward(Reward):
    """Base of rewards on text: `score(completions, prompts=None, answers=None) -> float32 [B]` on
    `self.device` (CPU for the rule-based rewards). Not differentiable."""

    modality = "text"
    needs_answers: bool = False
    device: torch.device = torch.device("cpu")

    def score(
        self,
        completions: Sequence[str],
        prompts: Sequence[str] | None = None,
        answers: Sequence[str | float | int] | None = None,
    ) -> torch.Tensor:
        """Scores B completions.

        Args:
            completions: B strings (the generated text).
            prompts: B strings or None (used by reward models: the scored text is prompt + completion).
            answers: B reference answers (strings or numbers), required by answer-checking rewards.

        Returns:
            float32 [B] on `self.device`.
        """
        completions = check_texts(completions, None, "completions", required=True)
        batch = len(completions)
        prompts = check_texts(prompts, batch, "prompts", required=False)
        if answers is None:
            if self.needs_answers:
                raise ValueError(f"answers is required by the {self.name} reward (one reference answer per sample)")
        else:
            if isinstance(answers, str) or not isinstance(answers, Sequence):
                raise TypeError(f"answers must be a list or tuple, one per sample; got {type(answers).__name__}")
            answers = list(answers)
            if len(answers) != batch:
                raise ValueError(f"answers has {len(answers)} entries but there are {batch} completions")
        return self._score_texts(completions, prompts, answers)

    @abc.abstractmethod
    def _score_texts(self, completions: list[str], prompts: list[str] | None, answers: list | None) -> torch.Tensor:
        """B completions -> float32 [B]."""
