"""Image rewards written as Python functions ('file.py:function' wherever a reward name is taken), the prompt
metadata they receive, and both diffusion trainers scoring with them (tiny models, torch backend)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from fusedrl.engine.diffusion.prompts import load_prompts, prompt_metadata
from fusedrl.engine.rewards import FunctionReward, load_reward
from fusedrl.engine.rewards.registry import check_reward_name

REWARDS_PY = textwrap.dedent("""
    import torch

    CALLS = []

    def mean_red(images, prompts, metadata):
        CALLS.append((len(images), list(prompts), [dict(m) for m in metadata]))
        return images[:, 0].mean(dim=(1, 2)) * torch.tensor([m.get("scale", 1.0) for m in metadata])

    def pixels_only(images):
        return [float(x) for x in images.mean(dim=(1, 2, 3))]

    def everything(images, **kw):
        return torch.tensor([len(kw["prompts"][i]) + len(kw["metadata"][i]) for i in range(len(images))])

    def detached(images, prompts):
        return images.detach().mean(dim=(1, 2, 3))

    def one_value(images):
        return torch.zeros(1)
""")


@pytest.fixture
def rewards_py(tmp_path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS_PY)
    return path


def test_function_reward_gets_images_in_0_1_prompts_and_metadata_per_micro_batch(rewards_py):
    reward = load_reward(f"{rewards_py}:mean_red", value_range=(-1, 1), max_batch_size=2)
    assert isinstance(reward, FunctionReward) and reward.name == f"{rewards_py}:mean_red"
    assert not reward.differentiable
    images = torch.rand(5, 3, 4, 4) * 2 - 1
    prompts = [f"p{i}" for i in range(5)]
    metadata = [{"scale": float(i)} for i in range(5)]
    scores = reward(images, prompts, metadata=metadata)
    expected = ((images[:, 0] + 1) / 2).mean(dim=(1, 2)) * torch.arange(5.0)
    torch.testing.assert_close(scores, expected)
    calls = reward.fn.__globals__["CALLS"]
    assert [c[0] for c in calls] == [2, 2, 1] and [p for c in calls for p in c[1]] == prompts
    assert [m for c in calls for m in c[2]] == metadata
    calls.clear()
    torch.testing.assert_close(reward(images.clamp(0, 1), prompts, value_range=(0, 1)),  # no metadata: {} each
                               images.clamp(0, 1)[:, 0].mean(dim=(1, 2)))
    assert [m for c in calls for m in c[2]] == [{}] * 5


def test_the_function_gets_only_what_its_signature_names(rewards_py):
    images = torch.rand(3, 3, 2, 2)
    only = load_reward(f"{rewards_py}:pixels_only")
    torch.testing.assert_close(only(images, ["a", "b", "c"], metadata=[{}] * 3), images.mean(dim=(1, 2, 3)))
    everything = load_reward(f"{rewards_py}:everything")
    assert everything(images, ["a", "bb", "ccc"], metadata=[{}, {"k": 1}, {"k": 1, "j": 2}]).tolist() == [1, 3, 5]


def test_differentiable_function_passes_gradients_and_a_detached_one_is_caught(rewards_py):
    images = torch.rand(2, 3, 4, 4, requires_grad=True)
    reward = load_reward(f"{rewards_py}:mean_red", differentiable=True)
    reward(images, ["a", "b"]).sum().backward()
    assert images.grad is not None and images.grad[:, 0].abs().sum() > 0 and images.grad[:, 1:].abs().sum() == 0
    detached = load_reward(f"{rewards_py}:detached", differentiable=True)
    with pytest.raises(RuntimeError, match="declared differentiable but returned scores with no gradient"):
        detached(torch.rand(2, 3, 4, 4, requires_grad=True), ["a", "b"])
    with pytest.raises(ValueError, match="returned 1 values for 2 images"):
        load_reward(f"{rewards_py}:one_value")(torch.rand(2, 3, 4, 4))


def test_bad_function_references_and_metadata_are_named(rewards_py, tmp_path):
    with pytest.raises(FileNotFoundError, match="the file .*nope.py' does not exist"):
        load_reward(f"{tmp_path}/nope.py:fn")
    with pytest.raises(ValueError, match="has no callable 'missing'"):
        load_reward(f"{rewards_py}:missing")
    with pytest.raises(ValueError, match="is a function and takes no path"):
        load_reward(f"{rewards_py}:mean_red", "/some/weights")
    with pytest.raises(ValueError, match="the file .*nope.py' does not exist"):
        check_reward_name(f"{tmp_path}/nope.py:fn")
    with pytest.raises(ValueError, match=r"unknown reward 'pickscor'; known: .*pickscore.*'file.py:function'"):
        check_reward_name("pickscor")
    assert check_reward_name("PickScore") == "pickscore" and check_reward_name(f"{rewards_py}:x") == f"{rewards_py}:x"
    reward = load_reward(f"{rewards_py}:mean_red")
    with pytest.raises(ValueError, match="metadata has 1 entries but there are 2 samples"):
        reward(torch.rand(2, 3, 2, 2), ["a", "b"], metadata=[{}])
    with pytest.raises(TypeError, match=r"metadata\[1\] must be a dict"):
        reward(torch.rand(2, 3, 2, 2), ["a", "b"], metadata=[{}, "x"])


def test_prompt_metadata_from_rows(tmp_path):
    rows = [{"prompt": "two cats", "tag": "counting", "include": [{"class": "cat", "count": 2}]},
            {"prompt": "a sign that says hi", "text": "hi", "score": float("nan")}, {"prompt": "plain"},
            {"prompt": " two cats ", "tag": "counting", "include": [{"class": "cat", "count": 2}]},
            {"prompt": "a sign that says hi", "text": "hi", "score": float("nan")}]  # NaN equals NaN here
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    meta = prompt_metadata([(path, "train")])
    assert meta == {"two cats": {"tag": "counting", "include": [{"class": "cat", "count": 2}]},
                    "a sign that says hi": {"text": "hi", "score": meta["a sign that says hi"]["score"]}}
    assert set(load_prompts(path)) == {"two cats", "a sign that says hi", "plain"}
    (tmp_path / "p.txt").write_text("a\nb\n")
    assert prompt_metadata([(tmp_path / "p.txt", "train"), (["a"], "train"), (None, "train")]) == {}
    other = tmp_path / "eval.jsonl"
    other.write_text(json.dumps({"prompt": "two cats", "tag": "other"}))
    with pytest.raises(ValueError, match=r"eval.jsonl:1: the prompt 'two cats' also appears at .*prompts.jsonl:1"):
        prompt_metadata([(path, "train"), (other, "train")])  # across the training and the eval prompts too
    path.write_text("\n".join(json.dumps(r) for r in rows[:1] + [{"prompt": "two cats", "tag": "other"}]))
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: the prompt 'two cats' also appears at .*prompts.jsonl:1"):
        prompt_metadata([(path, "train")])


def test_reward_files_may_define_dataclasses_and_report_their_errors(tmp_path):
    dc = tmp_path / "dc_reward.py"
    dc.write_text(textwrap.dedent("""
        from __future__ import annotations
        from dataclasses import dataclass

        @dataclass
        class Scale:
            factor: float = 2.0

        def score(images):
            return images.mean(dim=(1, 2, 3)) * Scale().factor
    """))
    images = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(load_reward(f"{dc}:score")(images), images.mean(dim=(1, 2, 3)) * 2)
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "dc_reward.py").write_text("def score(images):\n    return images.mean(dim=(1, 2, 3)) * 0\n")
    assert load_reward(f"{twin / 'dc_reward.py'}:score")(images).tolist() == [0.0, 0.0]  # same name, other file
    broken = tmp_path / "broken.py"
    broken.write_text("def score(images):\n    return 1 +\n")
    with pytest.raises(ValueError, match=r"running .*broken.py failed: SyntaxError"):
        load_reward(f"{broken}:score")
    with pytest.raises(ValueError, match="compile=True is not offered for reward functions"):
        load_reward(f"{dc}:score", compile=True)


# ------------------------------------------------------------------------------------------------ the trainers


@pytest.fixture
def jsonl_prompts(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "scale": s}) for p, s in (("a red apple", 2.0),
                                                                                ("a blue sky", 0.5))))
    return path


def test_prompts_with_differing_fields_load_when_no_reward_takes_metadata(rewards_py, tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from fusedrl.engine.config import ConfigError, build_config
    from fusedrl.engine.diffusion import tiny_model_dir
    from fusedrl.engine.diffusion.grpo import DiffusionGRPOConfig, GRPOTrainer

    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")
    dup = tmp_path / "dup.jsonl"  # e.g. an id column: the same caption on several rows
    dup.write_text("\n".join(json.dumps({"prompt": "a cat", "id": i}) for i in range(3)))
    base = {"model.model": str(tiny_model_dir("sd3", tmp_path / "models")), "prompts.train": str(dup)}
    assert GRPOTrainer(build_config(DiffusionGRPOConfig, base)).scorer.metadata == {}
    with pytest.raises(ConfigError, match=r"prompts: .*dup.jsonl:2: the prompt 'a cat' also appears at"):
        GRPOTrainer(build_config(DiffusionGRPOConfig, {**base, "reward.names": [f"{rewards_py}:mean_red"]}))


def test_diffusion_grpo_scores_with_a_function_and_the_prompt_metadata(rewards_py, jsonl_prompts, tmp_path,
                                                                        monkeypatch):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from fusedrl.engine.config import build_config
    from fusedrl.engine.diffusion import tiny_model_dir
    from fusedrl.engine.diffusion.grpo import DiffusionGRPOConfig, GRPOTrainer

    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")
    spec = f"{rewards_py}:mean_red"
    cfg = build_config(DiffusionGRPOConfig, {
        "model.model": str(tiny_model_dir("sd3", tmp_path / "models")), "prompts.train": str(jsonl_prompts),
        "prompts.per_step": 2, "sampling.group_size": 2, "sampling.steps": 2, "reward.names": ["brightness", spec],
        "reward.weights": [1.0, 0.5], "optim.lr": 1e-2})
    trainer = GRPOTrainer(cfg)
    m = trainer.train_step(1)
    assert m["skipped"] == 0 and f"reward/{spec}" in m and "reward/brightness" in m
    calls = trainer.scorer.rewards[spec].fn.__globals__["CALLS"]
    (n, prompts, metadata), = calls
    assert n == 4 and sorted(set(prompts)) == ["a blue sky", "a red apple"]
    assert metadata == [{"scale": 2.0} if p == "a red apple" else {"scale": 0.5} for p in prompts]


def test_reward_backprop_needs_a_function_declared_differentiable_and_passes_metadata(rewards_py, jsonl_prompts,
                                                                                      tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from fusedrl.engine.config import ConfigError, build_config
    from fusedrl.engine.diffusion.reward_backprop import RewardBackprop, RewardBackpropConfig

    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")
    spec = f"{rewards_py}:mean_red"
    with pytest.raises(ConfigError, match="the reward function .* must be declared differentiable"):
        build_config(RewardBackpropConfig, {"reward.names": [spec]})
    from fusedrl.engine.diffusion import tiny_model_dir

    cfg = build_config(RewardBackpropConfig, {
        "model": str(tiny_model_dir("sd3", tmp_path / "models")), "prompts.train": str(jsonl_prompts),
        "reward.names": [spec], "reward.options": {spec: {"differentiable": True}}, "sampling.num_steps": 2,
        "sampling.batch_size": 2, "backprop.truncation_k": 1, "prompts.num_eval": 2, "device": "cpu"})
    trainer = RewardBackprop.build(cfg)
    metrics = trainer.train_step(1)
    assert metrics["skipped"] == 0 and metrics["grad_norm"] > 0
    calls = trainer.reward.rewards[spec].fn.__globals__["CALLS"]
    assert calls and all(m == {"scale": 2.0} if p == "a red apple" else m == {"scale": 0.5}
                         for _, prompts, metadata in calls for p, m in zip(prompts, metadata))
