"""Full fine-tuning under FSDP2 with the weights read by rank 0 alone (`engine.distributed.shard_from_rank0`), on the
CPU with gloo (2 processes via torch.multiprocessing.spawn).

- The other processes build the model with its parameters on the meta device (`parameters_on_meta`: no host copy
  of the weights); after sharding, every process's whole parameters and buffers equal the checkpoint's, tied
  weights stay tied, and the sharded policy's log-probs equal an unsharded one's.
- The fused backbone: processes without weights replay rank 0's probes and fuse the same modules.
- A process whose model differs from rank 0's gets a ValueError naming the difference, on every process.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from .dist_helpers import free_port, setup_process

if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


class _Tied(nn.Module):
    """Tied embedding / head, a persistent and a non-persistent buffer, two blocks to shard."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, width)
        self.blocks = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])
        self.head = nn.Linear(width, 10, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.linspace(0.5, 1.5, width), persistent=False)
        self.register_buffer("shift", torch.arange(float(width)) * 0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) * self.scale + self.shift
        for block in self.blocks:
            h = torch.tanh(block(h))
        return self.head(h)


def _shard(module: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in module.blocks:
        fully_shard(block)
    fully_shard(module)


def test_parameters_on_meta_keeps_ties_and_real_buffers():
    from fusedrl.engine.distributed import parameters_on_meta, weights_on_this_process

    with parameters_on_meta():
        m = _Tied()
    assert all(p.is_meta for p in m.parameters()) and not weights_on_this_process(m)
    assert m.head.weight is m.emb.weight
    assert not m.scale.is_meta and torch.equal(m.scale, torch.linspace(0.5, 1.5, 6))
    assert not nn.Linear(2, 2).weight.is_meta  # the patch ends with the block
    assert weights_on_this_process(_Tied())


def _tied_worker(rank: int, world: int, port: int, mismatch: bool) -> None:
    setup_process(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from fusedrl.engine.distributed import parameters_on_meta, shard_from_rank0

        torch.manual_seed(0)
        want = _Tied()
        if rank == 0:
            m = _Tied()
            m.load_state_dict(want.state_dict())
        else:
            with parameters_on_meta():
                m = _Tied(width=8 if mismatch else 6)
            m.scale.fill_(-1.0)  # a buffer rank 0 holds otherwise: rank 0's wins
        if mismatch:
            with pytest.raises(ValueError, match=r"process 1's model differs from rank 0's.*emb\.weight"):
                shard_from_rank0(m, _shard, torch.device("cpu"))
            return
        shard_from_rank0(m, _shard, torch.device("cpu"))
        assert m.head.weight is m.emb.weight
        assert m.blocks[0].weight.to_local().shape[0] < 6  # sharded: each process holds part
        whole = {n: p.full_tensor() for n, p in m.named_parameters()}
        for n, p in want.named_parameters():
            assert torch.equal(whole[n], p), n
        for n, b in want.named_buffers():
            assert torch.equal(dict(m.named_buffers())[n], b), n
        ids = torch.tensor([[1, 2, 3, 9]])
        torch.testing.assert_close(m(ids), want(ids), rtol=0, atol=1e-6)
        m(ids).square().mean().backward()
        assert m.blocks[1].weight.grad is not None
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mismatch", [False, True], ids=["same", "mismatch"])
def test_shard_from_rank0_gives_every_process_rank0s_weights(mismatch):
    mp.spawn(_tied_worker, args=(2, free_port(), mismatch), nprocs=2, join=True)


def _policy_worker(rank: int, world: int, port: int, model_dir: str) -> None:
    setup_process(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import transformers

        from fusedrl.engine.distributed import all_gather_objects, weights_on_this_process
        from fusedrl.engine.llm.policy import Policy, SeqBatch

        policy = Policy.from_pretrained(model_dir, reference=True, weights_from_rank0=True)
        assert policy.weights_from_rank0
        for model in (policy.model, policy.ref_model):
            assert weights_on_this_process(model) == (rank == 0)
        policy.fuse_backbone()
        patch = policy.backbone_patch
        assert sum(patch.patched.values()) > 0
        ranks = all_gather_objects([(patch.patched, patch.skipped)])
        assert ranks[0] == ranks[1], ranks  # the same modules fused on both processes
        policy.parallelize("fsdp", torch.device("cpu"))

        loaded = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        for model in (policy.model, policy.ref_model):
            whole = {n: p.full_tensor() for n, p in model.named_parameters()}
            for n, p in loaded.named_parameters():
                assert torch.equal(whole[n], p), n
            for n, b in loaded.named_buffers():
                assert torch.equal(dict(model.named_buffers())[n].cpu(), b), n
        ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
        ones = torch.ones_like(ids)
        batch = SeqBatch(ids[:, :2], ones[:, :2], ids[:, 2:], ones[:, 2:])
        plain = Policy.from_model(loaded, policy.tokenizer)
        with torch.no_grad():
            torch.testing.assert_close(policy.logprobs(batch), plain.logprobs(batch), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(policy.logprobs(batch, reference=True), plain.logprobs(batch),
                                       rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_llm_policy_weights_from_rank0(tmp_path):
    pytest.importorskip("transformers")
    from fusedrl.engine.llm.tiny import build_tiny_model

    model_dir = str(build_tiny_model(tmp_path / "qwen2", arch="qwen2", hidden_size=32, seed=5))
    mp.spawn(_policy_worker, args=(2, free_port(), model_dir), nprocs=2, join=True)


def _diffusion_worker(rank: int, world: int, port: int, model_dir: str) -> None:
    setup_process(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from fusedrl.engine.diffusion.policy import load_policy
        from fusedrl.engine.distributed import all_gather_objects, weights_on_this_process

        policy = load_policy(model_dir, device="cpu", lora=False, reference_copy=True, sharded=True,
                             fused_backbone=True)
        assert policy.weights_from_rank0
        for module in policy._denoisers():
            assert weights_on_this_process(module) == (rank == 0)
        if policy.backbone_patch is not None:
            patch = policy.backbone_patch
            ranks = all_gather_objects([(patch.patched, patch.skipped)])
            assert ranks[0] == ranks[1], ranks
        policy.parallelize("fsdp")

        plain = load_policy(model_dir, device="cpu", lora=False, reference_copy=True)
        loaded = plain.denoiser
        for module, dtype in ((policy.denoiser, torch.float32), (policy._reference_model, policy.dtype)):
            whole = {n: p.full_tensor() for n, p in module.named_parameters()}
            for n, p in loaded.named_parameters():
                assert whole[n].dtype == dtype and torch.equal(whole[n], p.to(dtype)), n
            for n, b in loaded.named_buffers():
                assert torch.equal(dict(module.named_buffers())[n], b), n
        g = torch.Generator().manual_seed(1)
        h = plain.defaults["height"] // plain.vae_scale_factor
        latents = torch.randn((2, plain.latent_channels, h, h), generator=g)
        emb = plain.encode_prompts(["a red cube", "two dogs"])
        with torch.no_grad():
            torch.testing.assert_close(policy.predict(latents, 500, emb),
                                       plain.predict(latents, 500, emb), rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_diffusion_policy_weights_from_rank0(tmp_path, family):
    pytest.importorskip("diffusers")
    from fusedrl.engine.diffusion import tiny_model_dir

    model_dir = str(tiny_model_dir(family, tmp_path))
    mp.spawn(_diffusion_worker, args=(2, free_port(), model_dir), nprocs=2, join=True)
