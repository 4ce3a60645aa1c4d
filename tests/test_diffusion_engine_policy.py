"""fusedrl.engine.diffusion.policy and .tiny: tiny SD1.5-, SD3- and Flux-shaped pipelines saved and loaded with the
real save_pretrained / from_pretrained; LoRA (save -> diffusers load_lora_weights round trip, disable_adapter);
full fine-tuning with a reference copy; CFG batching; argument errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from fusedrl.engine.diffusion import LoraOptions, load_policy, tiny_model_dir  # noqa: E402

FAMILIES = ("sd3", "sd", "flux")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {fam: tiny_model_dir(fam, root) for fam in FAMILIES}


def _randomize_lora(policy, seed: int = 0) -> None:
    """LoRA B starts at zero (the adapter is the identity): give it values so that outputs change."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [policy.denoiser, *policy.lora_text_encoders]:
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _inputs(policy, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h, w = policy.check_size(policy.defaults["height"], policy.defaults["width"])
    x = torch.randn(batch, policy.latent_channels, h, w, generator=g)
    t = policy.schedule(4).timesteps[1]
    return x, t


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_loads_with_from_pretrained(tiny_dirs, family):
    path = tiny_dirs[family]
    assert (path / "model_index.json").is_file() and (path / "fusedrl_policy.json").is_file()
    policy = load_policy(path)
    assert policy.family == family and policy.is_flow == (family != "sd")
    assert type(policy.scheduler).__name__ == ("DDIMScheduler" if family == "sd" else "FlowMatchEulerDiscreteScheduler")
    assert policy.defaults["height"] == 32 and policy.check_size(32, 32) == (8, 8)
    # frozen weights in the policy dtype, trainable (LoRA) parameters in fp32, nothing else trainable
    trainable = policy.trainable_parameters()
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    names = [n for n, p in policy.denoiser.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any(p.requires_grad for p in policy.vae.parameters())
    # a second load of the same folder gives the same weights (seeded build, real from_pretrained)
    again = load_policy(path, lora=False)
    base = {n.replace(".base_layer", ""): p for n, p in policy.denoiser.named_parameters() if "lora_" not in n}
    again_params = dict(again.denoiser.named_parameters())
    assert base.keys() == again_params.keys()
    assert all(torch.equal(p, again_params[n]) for n, p in base.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_decode_predict_shapes(tiny_dirs, family):
    policy = load_policy(tiny_dirs[family])
    emb = policy.encode_prompts(["a cat", "a dog", "a cat"])
    assert len(emb) == 3 and emb.embeds.ndim == 3 and (emb.pooled is None) == (family == "sd")
    assert torch.equal(emb.embeds[0], emb.embeds[2])  # cached per prompt string
    assert set(policy._cache) == {"a cat", "a dog"}
    # a prompt's cached embedding does not depend on the prompts it was first encoded with (a resumed run's
    # cache starts empty and meets its prompts in other company)
    alone = load_policy(tiny_dirs[family]).encode_prompts(["a dog"])
    assert torch.equal(alone.embeds[0], emb.embeds[1])
    assert alone.pooled is None or torch.equal(alone.pooled[0], emb.pooled[1])
    x, t = _inputs(policy, 3)
    with torch.no_grad():
        for g in (1.0, 3.0):
            out = policy.predict(x, t, emb, guidance_scale=g)
            assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
        images = policy.decode(x)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("family", ("sd3", "sd"))
def test_cfg_is_one_batched_call_with_the_guidance_formula(tiny_dirs, family):
    policy = load_policy(tiny_dirs[family])
    x, t = _inputs(policy)
    emb = policy.encode_prompts(["a cat", "a dog"])
    calls = []
    hook = policy.denoiser.register_forward_hook(lambda m, args, kwargs_out: calls.append(1))
    with torch.no_grad():
        guided = policy.predict(x, t, emb, guidance_scale=5.0)
        assert len(calls) == 1  # uncond and cond in one 2B batch
        cond = policy.predict(x, t, emb, guidance_scale=1.0)
        uncond = policy.predict(x, t, policy.negative_embeddings(2), guidance_scale=1.0)
    hook.remove()
    torch.testing.assert_close(guided, uncond + 5.0 * (cond - uncond), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_save_then_diffusers_load_lora_weights_gives_identical_outputs(tiny_dirs, family, checkpointed,
                                                                            tmp_path):
    """The saved LoRA loads into the pipeline with diffusers' own load_lora_weights and gives the policy's outputs,
    also with the denoiser's blocks checkpointed (peft's adapter state dict left out every LoRA layer inside a
    CheckpointWrapper: an almost empty file for SD3, a failed save for SD1.5 and Flux)."""
    import diffusers

    from fusedrl.engine.checkpointing import apply_checkpointing, iter_wrappers
    from fusedrl.engine.diffusion.policy import block_names

    text = family != "flux"  # text-encoder LoRA (TexForce) on the CLIP encoders of SD and SD3
    policy = load_policy(tiny_dirs[family], lora=LoraOptions(rank=4, alpha=8, text_encoder=text))
    assert bool(policy.lora_text_encoders) == text and policy.text_encoder_trainable == text
    _randomize_lora(policy)
    if checkpointed:
        blocks = set(block_names(policy.denoiser))
        assert apply_checkpointing(policy.denoiser, "full", predicate=lambda name, _m: name in blocks)
        wrappers = [w for _, w in iter_wrappers(policy.denoiser)]
    policy.save_lora(tmp_path / "lora")
    if checkpointed:  # the wrappers are back after the save
        assert [w for _, w in iter_wrappers(policy.denoiser)] == wrappers
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    extra = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_dirs[family], **extra)
    pipe.load_lora_weights(tmp_path / "lora")
    loaded = load_policy(pipe, lora=False)

    x, t = _inputs(policy)
    with torch.no_grad():
        ours = policy.predict(x, t, policy.encode_prompts(["a cat", "a dog"]), guidance_scale=2.0)
        theirs = loaded.predict(x, t, loaded.encode_prompts(["a cat", "a dog"]), guidance_scale=2.0)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ("sd3", "sd"))
def test_disable_adapter_gives_the_base_model(tiny_dirs, family):
    policy = load_policy(tiny_dirs[family], lora=LoraOptions(rank=4, text_encoder=family == "sd"))
    base = load_policy(tiny_dirs[family], lora=False)
    _randomize_lora(policy)
    x, t = _inputs(policy)
    prompts = ["a cat", "a dog"]
    with torch.no_grad():
        adapted = policy.predict(x, t, policy.encode_prompts(prompts), 2.0)
        with policy.disable_adapter():
            off = policy.predict(x, t, policy.encode_prompts(prompts), 2.0)
        with policy.reference():
            ref = policy.predict(x, t, policy.encode_prompts(prompts), 2.0)
        again = policy.predict(x, t, policy.encode_prompts(prompts), 2.0)
        expected = base.predict(x, t, base.encode_prompts(prompts), 2.0)
    assert (adapted - expected).abs().max() > 1e-3
    torch.testing.assert_close(off, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(off, ref) and torch.equal(again, adapted)  # re-enabled on exit


@pytest.mark.parametrize("family", FAMILIES)
def test_text_encoder_only_lora(tiny_dirs, family, tmp_path):
    """TexForce's recipe: LoRA on the CLIP text encoder(s) alone. The denoiser stays frozen but passes the gradient
    to the embeddings; the adapter-off model is the base model; the saved file holds the text encoders' layers only
    and diffusers' load_lora_weights reproduces the policy's outputs."""
    import diffusers

    policy = load_policy(tiny_dirs[family], lora=LoraOptions(rank=4, alpha=8, text_encoder=True, denoiser=False))
    assert policy.trained_part() == "LoRA on the text encoder(s)"
    assert not any(p.requires_grad for p in policy.denoiser.parameters())
    assert not any("lora_" in n for n, _ in policy.denoiser.named_parameters())
    trainable = policy.trainable_parameters()
    te_params = {id(p) for te in policy.lora_text_encoders for p in te.parameters()}
    assert trainable and all(id(p) in te_params for p in trainable)
    _randomize_lora(policy)
    x, t = _inputs(policy)
    prompts = ["a cat", "a dog"]
    base = load_policy(tiny_dirs[family], lora=False)
    with torch.no_grad():
        expected = base.predict(x, t, base.encode_prompts(prompts), 2.0)
        with policy.disable_adapter():
            off = policy.predict(x, t, policy.encode_prompts(prompts), 2.0)
        adapted = policy.predict(x, t, policy.encode_prompts(prompts), 2.0)
    torch.testing.assert_close(off, expected, atol=1e-6, rtol=1e-6)
    assert (adapted - expected).abs().max() > 1e-4
    policy.predict(x, t, policy.encode_prompts(prompts), 2.0).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable if "lora_B" in _name(policy, p))

    sd = policy.lora_state_dicts()
    assert not any(k.startswith(("unet", "transformer")) for k in sd) and "text_encoder_lora_layers" in sd
    policy.save_lora(tmp_path / "lora")
    extra = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_dirs[family], **extra)
    pipe.load_lora_weights(tmp_path / "lora")
    loaded = load_policy(pipe, lora=False)
    with torch.no_grad():
        theirs = loaded.predict(x, t, loaded.encode_prompts(prompts), 2.0)
    torch.testing.assert_close(theirs, adapted, atol=1e-5, rtol=1e-5)


def _name(policy, param) -> str:
    return next(n for te in policy.lora_text_encoders for n, p in te.named_parameters() if p is param)


def test_full_finetuning_with_reference_copy_and_ema(tiny_dirs):
    policy = load_policy(tiny_dirs["sd3"], lora=False, reference_copy=True)
    assert policy.lora is None and policy.compute_dtype == torch.float32
    params = policy.trainable_parameters()
    assert len(params) == len(list(policy.denoiser.parameters()))
    x, t = _inputs(policy)
    emb = policy.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        before = policy.predict(x, t, emb)
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
        after = policy.predict(x, t, emb)
        with policy.reference():
            ref = policy.predict(x, t, emb)
        assert (after - before).abs().max() > 1e-3
        assert torch.equal(ref, before)
        policy.update_reference_ema(0.0)  # reference <- current weights
        with policy.reference():
            torch.testing.assert_close(policy.predict(x, t, emb), after)
    with pytest.raises(RuntimeError, match="no LoRA"), policy.disable_adapter():
        pass
    with pytest.raises(RuntimeError, match="reference_copy"), load_policy(tiny_dirs["sd3"], lora=False).reference():
        pass


def test_rebuilt_from_state_holds_the_state_and_unsaved_buffers(tiny_dirs):
    """What an FSDP2 run saves: a plain model built (on the meta device) from the config, holding the gathered
    state; a buffer no state dict carries (persistent=False) is copied from the running model."""
    from diffusers import ConfigMixin, ModelMixin, SD3Transformer2DModel
    from diffusers.configuration_utils import register_to_config

    from fusedrl.engine.diffusion.policy import rebuilt_from_state

    model = SD3Transformer2DModel.from_pretrained(tiny_dirs["sd3"], subfolder="transformer")
    state = {k: v + 1 for k, v in model.state_dict().items()}
    plain = rebuilt_from_state(model, state)
    assert type(plain) is SD3Transformer2DModel and plain is not model
    assert plain.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())

    class WithFreqs(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, dim: int = 4):
            super().__init__()
            self.proj = torch.nn.Linear(dim, dim)
            self.register_buffer("freqs", torch.arange(float(dim)), persistent=False)

    model = WithFreqs()
    model.freqs.mul_(3)
    plain = rebuilt_from_state(model, {k: v.clone() for k, v in model.state_dict().items()})
    assert "freqs" not in model.state_dict() and torch.equal(plain.freqs, model.freqs)
    assert not any(t.is_meta for t in [*plain.parameters(), *plain.buffers()])


def test_argument_errors(tiny_dirs):
    with pytest.raises(ValueError, match="rank"):
        LoraOptions(rank=0)
    with pytest.raises(ValueError, match="LoRA on nothing"):
        LoraOptions(denoiser=False)
    with pytest.raises(ValueError, match="reference_copy"):
        load_policy(tiny_dirs["sd"], reference_copy=True)
    with pytest.raises(ValueError, match="sharded=True is for full fine-tuning"):
        load_policy(tiny_dirs["sd"], sharded=True)
    with pytest.raises(ValueError, match="dtype"):
        load_policy(tiny_dirs["sd"], dtype="int8")
    policy = load_policy(tiny_dirs["sd"])
    x, t = _inputs(policy)
    emb = policy.encode_prompts(["a", "b"])
    with pytest.raises(ValueError, match="latents"):
        policy.predict(x[0], t, emb)
    with pytest.raises(ValueError, match="rows"):
        policy.predict(x, t, policy.encode_prompts(["a"]))
    with pytest.raises(TypeError, match="embeddings"):
        policy.predict(x, t, emb.embeds)
    with pytest.raises(TypeError, match="prompts"):
        policy.encode_prompts("a cat")
    with pytest.raises(ValueError, match="height"):
        policy.schedule(4, height=30, width=32)
    with pytest.raises(ValueError, match="num_steps"):
        policy.schedule(0)


def test_import_fusedrl_engine_diffusion_is_light():
    code = ("import sys, fusedrl.engine, fusedrl.engine.diffusion; "
            "print([m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("[]"), proc.stdout
