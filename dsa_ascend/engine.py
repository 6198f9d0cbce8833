"""generate(): batching of prompts of different lengths, chunked prefill, decode loop, sampling.

Scheduling is continuous: up to ``max_batch_size`` sequences hold a cache row each; a finished
sequence frees its row for the next waiting prompt. Prompts are prefilled in packed ragged steps
of at most ``prefill_chunk_size`` tokens per sequence; decode steps advance every running
sequence by one token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

Prompt = Union[str, Sequence[int]]


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)  # generated ids, without the stop token
    text: Optional[str] = None
    finish_reason: str = "length"  # "stop" (a stop token) or "length"


def sample(logits: Tensor, temperature: float, top_p: float,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """logits [R, V] -> token ids [R]: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # the top token always stays
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def _encode(prompts: Sequence[Prompt], tokenizer, bos: int, add_bos: bool) -> list[list[int]]:
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError(f"prompt {i} is text but no tokenizer is available (the "
                                 "checkpoint has no tokenizer.json; pass tokenizer= or token ids)")
            ids = tokenizer.encode(p, add_special_tokens=False).ids
            ids = [bos] + ids if add_bos else ids
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        out.append(ids)
    return out


@torch.inference_mode()
def generate(model, prompts: Union[Prompt, Sequence[Prompt]], *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_p: float = 1.0,
             stop_token_ids: Optional[Sequence[int]] = None, seed: Optional[int] = None,
             tokenizer=None, add_bos: bool = True) -> list[Completion]:
    """Continue each prompt (text, or token ids) and return one Completion per prompt, in order.

    Greedy when ``temperature`` is 0; otherwise temperature + top-p sampling (seeded by
    ``seed``). Generation stops at a stop token (default: the model's EOS), after
    ``max_new_tokens``, or when the sequence reaches the model's max_seq_len.
    """
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                    and isinstance(prompts[0], int)):
        prompts = [prompts]
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    cfg, run = model.config, model.run
    encoded = _encode(prompts, tokenizer, cfg.bos_token_id, add_bos)
    for i, ids in enumerate(encoded):
        if len(ids) >= run.max_seq_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; max_seq_len={run.max_seq_len} "
                             "leaves no room to generate")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]} is outside the vocabulary "
                             f"[0, {cfg.vocab_size})")
    stops = set(stop_token_ids) if stop_token_ids is not None else {cfg.eos_token_id}
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    results = [Completion(prompt_tokens=ids) for ids in encoded]

    waiting = list(range(len(encoded)))
    free_rows = list(range(run.max_batch_size - 1, -1, -1))
    running: dict[int, int] = {}  # row -> prompt index
    model.reset()

    def accept(rows: list[int], logits: Tensor) -> None:
        tokens = sample(logits, temperature, top_p, gen)
        if temperature > 0:  # multi-device: ranks hold their own RNG state; rank 0's draw counts
            tokens = model.parallel.broadcast(tokens)
        for row, tok in zip(rows, tokens.tolist()):
            i = running[row]
            res = results[i]
            done = tok in stops
            if done:
                res.finish_reason = "stop"
            else:
                res.tokens.append(tok)
                done = (len(res.tokens) >= max_new_tokens
                        or len(res.prompt_tokens) + len(res.tokens) >= run.max_seq_len)
            if done:
                del running[row]
                model.reset([row])
                free_rows.append(row)

    while waiting or running:
        admitted = []
        while waiting and free_rows:
            row = free_rows.pop()
            running[row] = waiting.pop(0)
            admitted.append(row)
        if admitted:  # chunked, packed prefill of the new prompts
            prompt_of = {r: encoded[running[r]] for r in admitted}
            chunk = run.prefill_chunk_size
            for off in range(0, max(len(p) for p in prompt_of.values()), chunk):
                rows = [r for r in admitted if len(prompt_of[r]) > off]
                logits = model.forward_ragged([prompt_of[r][off:off + chunk] for r in rows],
                                              rows, [off] * len(rows), last_only=True)
                ending = [(r, lg) for r, lg in zip(rows, logits) if len(prompt_of[r]) <= off + chunk]
                if ending:
                    accept([r for r, _ in ending], torch.stack([lg for _, lg in ending]))
            continue
        rows = sorted(running)
        logits = model.forward_ragged(
            [results[running[r]].tokens[-1:] for r in rows], rows,
            [len(results[running[r]].prompt_tokens) + len(results[running[r]].tokens) - 1
             for r in rows], last_only=True)
        accept(rows, torch.stack(logits))

    if tokenizer is not None:
        for res in results:
            res.text = tokenizer.decode(res.tokens)
    return results
