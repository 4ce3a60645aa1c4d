"""The reward benchmark cases (fusedrl/bench/cases/rewards.py): the ViT FLOP count on a hand-computed number, the
default-size models have the published sizes (built on the meta device: no memory, no download), and a small run
through `fusedrl bench` gives images/s for the loop and the batched call."""

from __future__ import annotations

import argparse

import torch

from fusedrl.bench import add_arguments, run
from fusedrl.bench.cases import CaseConfig, collect
from fusedrl.bench.cases import rewards as cases


def test_vit_flops_hand_computed():
    # CLIP ViT-L/14 at 224 px: N = 257 tokens, D = 1024, I = 4096, 24 layers, 256 patches of 3 x 14 x 14
    n, d, i = 257, 1024, 4096
    per_layer = 2 * n * d * 3 * d + 2 * n * d * d + 4 * n * d * i + 4 * n * n * d
    assert cases.vit_flops(cases.VIT_L14) == 24 * per_layer + 2 * 256 * 3 * 14 * 14 * d == 162_023_964_672


def test_default_models_have_the_published_sizes():
    reward, nbytes = cases.build_reward(cases.SPECS["default"][1], torch.float32, torch.device("meta"))
    assert type(reward).__name__ == "ClipReward"
    assert nbytes // 4 == 427_616_513  # openai/clip-vit-large-patch14's parameter count
    cfg = reward.model.config
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers, cfg.vision_config.patch_size) == \
        (1024, 24, 14)
    ir, _ = cases.build_reward(cases.SPECS["default"][3], torch.bfloat16, torch.device("meta"))
    v = ir.model.config.vision_config
    assert (v.hidden_size, v.num_hidden_layers, v.patch_size, v.layer_norm_eps) == (1024, 24, 16, 1e-6)
    assert ir.model.dtype == torch.bfloat16 and ir.model.config.text_config.vocab_size == 30524


def test_cases_and_small_run_report_images_per_second(tmp_path):
    config = CaseConfig(device=torch.device("cpu"), sizes="small", dtypes=(torch.float32,))
    found = collect(config, ["rewards"])
    assert {c.op for c in found} == {"reward_aesthetic", "reward_clip_score", "reward_pickscore", "reward_imagereward"}
    assert {c.shape[0] for c in found} == {1, 4}
    assert all(c.flops == c.shape[0] * cases.vit_flops(cases.TINY_VIT) and c.bytes > 0 for c in found)
    default = CaseConfig(device=torch.device("cuda"), sizes="default", dtypes=(torch.bfloat16, torch.float32))
    assert {c.shape for c in collect(default, ["reward_pickscore"])} == {(b, 3, 224, 224) for b in (1, 8, 64, 256)}

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "rewards.csv"
    assert run(parser.parse_args(["--device", "cpu", "--sizes", "small", "--reps", "1", "--no-compile", "--ops",
                                  "reward_aesthetic,reward_imagereward", "--csv", str(out)])) == 0
    rows = cases.images_per_second(str(out))
    assert {(r["op"], r["provider"], r["batch"]) for r in rows} == {
        (op, p, b) for op in ("reward_aesthetic", "reward_imagereward") for p in ("eager", "torch") for b in (1, 4)}
    assert all(r["images_per_s"] > 0 for r in rows)
