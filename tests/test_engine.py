"""generate(): batching prompts of different lengths changes nothing; stops; sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import EXACT

import dsa_ascend


@pytest.fixture
def model(load_tiny):
    # prefill_chunk_size 8 makes the long prompts take several packed prefill steps.
    return load_tiny(max_batch_size=3, prefill_chunk_size=8, **EXACT)


PROMPTS = ["Sparse attention", "a", "The lightning indexer picks 2048 tokens of 128K",
           "Ascend NPU", "CUDA"]


def test_batched_generation_equals_each_alone(model):
    # 5 prompts, 3 rows: rows are recycled while others are mid-decode.
    batched = dsa_ascend.generate(model, PROMPTS, max_new_tokens=12)
    for prompt, got in zip(PROMPTS, batched):
        alone = dsa_ascend.generate(model, [prompt], max_new_tokens=12)[0]
        assert got.tokens == alone.tokens, prompt
        assert got.prompt_tokens == alone.prompt_tokens
        assert got.text == alone.text


def test_generation_matches_a_manual_greedy_loop(model):
    res = dsa_ascend.generate(model, [PROMPTS[2]], max_new_tokens=6)[0]
    ids = list(res.prompt_tokens)
    for _ in range(6):
        model.reset()
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert res.tokens == ids[len(res.prompt_tokens):]


def test_stop_tokens_end_generation(model):
    free = dsa_ascend.generate(model, [PROMPTS[0]], max_new_tokens=8)[0]
    stop = free.tokens[3]
    first = free.tokens.index(stop)
    res = dsa_ascend.generate(model, [PROMPTS[0]], max_new_tokens=8, stop_token_ids=[stop])[0]
    assert res.finish_reason == "stop" and res.tokens == free.tokens[:first]
    assert free.finish_reason == "length" and len(free.tokens) == 8


def test_sampling_is_seeded_and_top_p_narrows(model):
    a = dsa_ascend.generate(model, PROMPTS[:2], max_new_tokens=8, temperature=1.0, seed=5)
    b = dsa_ascend.generate(model, PROMPTS[:2], max_new_tokens=8, temperature=1.0, seed=5)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    greedy = dsa_ascend.generate(model, PROMPTS[:2], max_new_tokens=8)
    tiny_p = dsa_ascend.generate(model, PROMPTS[:2], max_new_tokens=8, temperature=1.0,
                                 top_p=1e-6, seed=1)
    assert [r.tokens for r in tiny_p] == [r.tokens for r in greedy]  # nucleus of one token


def test_sample_top_p_keeps_the_nucleus():
    from dsa_ascend.engine import sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample(logits, 1.0, 0.7, g)) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 covers 0.7; 0.15 and 0.05 are outside


def test_generation_stops_at_max_seq_len(load_tiny):
    model = load_tiny(max_seq_len=24, **EXACT)
    res = dsa_ascend.generate(model, [list(range(1, 20))], max_new_tokens=50, stop_token_ids=[])
    assert len(res[0].prompt_tokens) + len(res[0].tokens) == 24
    assert res[0].finish_reason == "length"


def test_text_prompt_needs_a_tokenizer(model):
    model.tokenizer, tok = None, model.tokenizer
    with pytest.raises(ValueError, match="no tokenizer"):
        dsa_ascend.generate(model, ["hello"])
    res = dsa_ascend.generate(model, ["hello"], tokenizer=tok, max_new_tokens=2)
    assert res[0].prompt_tokens[0] == model.config.bos_token_id
    assert tok.decode(res[0].prompt_tokens[1:]) == "hello"
