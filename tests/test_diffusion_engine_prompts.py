"""fusedrl.engine.diffusion.prompts: .txt / .jsonl / .csv / datasets loading, errors, deterministic shuffling."""

from __future__ import annotations

import json

import pytest

from fusedrl.engine.diffusion.prompts import DEFAULT_EVAL_PROMPTS, DEFAULT_PROMPTS, load_prompts, prompt_batch


def test_txt(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \na bird\n")
    assert load_prompts(f) == ["a cat", "a dog", "a bird"]
    assert load_prompts(str(f), limit=2) == ["a cat", "a dog"]


def test_jsonl_field_and_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a cat", "x": 1}) + "\n\n" + json.dumps({"prompt": "a dog"}) + "\n")
    assert load_prompts(f) == ["a cat", "a dog"]
    g = tmp_path / "q.jsonl"
    g.write_text(json.dumps({"caption": "a cat"}) + "\n" + json.dumps({"text": "a dog"}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl:2: no field 'caption'"):
        load_prompts(g, field="caption")
    h = tmp_path / "bad.jsonl"
    h.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        load_prompts(h)
    t = tmp_path / "types.jsonl"
    t.write_text(json.dumps({"prompt": 3}) + "\n")
    with pytest.raises(TypeError, match="not a string"):
        load_prompts(t)


def test_csv_column_and_errors(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('id,text\n1,a cat\n2,"a dog, running"\n3,\n')
    assert load_prompts(f, field="text") == ["a cat", "a dog, running"]
    with pytest.raises(ValueError, match=r"no column 'prompt' \(columns: \['id', 'text'\]\)"):
        load_prompts(f)
    # Excel's "CSV UTF-8" (and some editors' JSONL / TXT) start with a byte-order mark: not part of the first name
    f.write_bytes(b"\xef\xbb\xbftext,id\na cat,1\n")
    assert load_prompts(f, field="text") == ["a cat"]
    (tmp_path / "p.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "a fox"}\n')
    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbfa owl\n")
    assert load_prompts(tmp_path / "p.jsonl") == ["a fox"] and load_prompts(tmp_path / "p.txt") == ["a owl"]


def test_empty_missing_and_unsupported(tmp_path):
    for name, text in (("e.txt", ""), ("b.txt", "\n  \n"), ("e.jsonl", "\n"), ("e.csv", "")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match="no prompts"):
            load_prompts(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="unsupported extension '.tsv'"):
        load_prompts(tmp_path / "p.tsv")
    with pytest.raises(ValueError, match="unknown extension '.tsv2'"):  # a typo, not a hub dataset (no network wait)
        load_prompts("prompts.tsv2")
    (tmp_path / "l.json").write_text('["a cat", {"prompt": "a dog"}]')  # .json and .parquet read too
    assert load_prompts(tmp_path / "l.json") == ["a cat", "a dog"]
    with pytest.raises(TypeError, match="source"):
        load_prompts(3)
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts([])


def test_deterministic_shuffle_and_separate_eval():
    a = load_prompts(DEFAULT_PROMPTS, seed=1)
    assert a == load_prompts(DEFAULT_PROMPTS, seed=1) and sorted(a) == sorted(DEFAULT_PROMPTS)
    assert a != load_prompts(DEFAULT_PROMPTS, seed=2) and load_prompts(DEFAULT_PROMPTS) == DEFAULT_PROMPTS
    assert not set(DEFAULT_EVAL_PROMPTS) & set(DEFAULT_PROMPTS)


def test_prompt_batch_is_a_pure_function_of_step():
    prompts = [f"p{i}" for i in range(10)]
    batches = [prompt_batch(prompts, s, 4, seed=3) for s in range(5)]  # 20 draws = 2 epochs
    assert batches == [prompt_batch(prompts, s, 4, seed=3) for s in range(5)]
    flat = [p for b in batches for p in b]
    assert sorted(flat[:10]) == prompts and sorted(flat[10:]) == prompts  # each epoch a permutation
    assert flat[:10] != flat[10:]
    assert prompt_batch(prompts, 0, 4, seed=4) != batches[0]
    with pytest.raises(ValueError, match="step"):
        prompt_batch(prompts, -1, 4)
    with pytest.raises(ValueError, match="batch_size"):
        prompt_batch(prompts, 0, 0)


def test_datasets_folder(tmp_path):
    pytest.importorskip("datasets")
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps({"caption": f"c{i}"}) + "\n" for i in range(3)))
    assert load_prompts(str(d), field="caption") == ["c0", "c1", "c2"]
    with pytest.raises(ValueError, match="no column 'prompt'"):
        load_prompts(str(d))
