"""Deterministic HF-format checkpoints from a preset and a seed (for tests and the demo).

The tensor list comes from the model itself (built on the meta device), so the maker and the
loader cannot disagree. Quantizable linears are stored as the official release stores them:
float8_e4m3fn weights with float32 ``weight_scale_inv`` per 128x128 block (ue8m0 powers of two
when the config's scale_fmt says so); the router's score-correction bias is float32; everything
else bfloat16. An MTP layer (index n_layers) is included, as in the release.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_FILE, SCALE_SUFFIX, SINGLE_FILE
from .config import ModelConfig, RunConfig, preset
from .quant import quantize_weight

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def _tensors(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    from .model.layers import Linear
    from .model.transformer import Transformer

    model = Transformer(config, RunConfig(), backend="reference", dtype=torch.bfloat16)
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, Linear)}
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    out: dict[str, torch.Tensor] = {}
    params = list(model.named_parameters())
    mtp = config.n_layers
    # The MTP module's own tensors (DSA_SPEC §8); the loader must skip them.
    params += [(f"model.layers.{mtp}.enorm.weight", torch.empty(config.dim)),
               (f"model.layers.{mtp}.hnorm.weight", torch.empty(config.dim)),
               (f"model.layers.{mtp}.shared_head.norm.weight", torch.empty(config.dim))]
    for key, p in params:
        shape = tuple(p.shape)
        linear = linears.get(key)
        if linear is not None:
            w = randn(*shape) * shape[1] ** -0.5
            if linear.quantizable and config.quant is not None:
                q, s = quantize_weight(w, ue8m0=config.quant.ue8m0)
                out[key], out[key + SCALE_SUFFIX] = q, s
            else:
                out[key] = w.to(torch.bfloat16)
        elif key.endswith("e_score_correction_bias"):
            out[key] = randn(*shape) * 0.05
        elif key.endswith("gate.weight"):
            out[key] = (randn(*shape) * shape[1] ** -0.5).to(torch.bfloat16)
        elif key.endswith("embed_tokens.weight"):
            out[key] = randn(*shape).to(torch.bfloat16)
        elif key.endswith("k_norm.bias"):
            out[key] = (randn(*shape) * 0.05).to(torch.bfloat16)
        else:  # norm weights
            out[key] = (1.0 + randn(*shape) * 0.05).to(torch.bfloat16)
    w = randn(config.dim, 2 * config.dim) * (2 * config.dim) ** -0.5
    q, s = quantize_weight(w, ue8m0=config.ue8m0)
    out[f"model.layers.{mtp}.eh_proj.weight"], out[f"model.layers.{mtp}.eh_proj.weight" + SCALE_SUFFIX] = q, s
    return out


def _tokenizer_json(config: ModelConfig) -> str:
    """A byte-level tokenizer: ids 0/1 = BOS/EOS, then the 256 byte symbols."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {BOS: config.bos_token_id, EOS: config.eos_token_id}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    if len(vocab) > config.vocab_size:
        raise ValueError(f"vocab_size={config.vocab_size} is too small for the byte tokenizer "
                         f"({len(vocab)} tokens)")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    return tok.to_str(pretty=True)


def make_tiny_checkpoint(out_dir: str, preset_name: str = "tiny", seed: int = 0, shards: int = 2,
                         overwrite: bool = False, config: Optional[ModelConfig] = None) -> str:
    """Write an HF-format checkpoint directory; returns ``out_dir``.

    Written into a temporary sibling directory and renamed when complete, so an interrupted run
    never leaves a half-written checkpoint under ``out_dir``.
    """
    config = config or preset(preset_name)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True / --overwrite to replace it)")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    tensors = _tensors(config, seed)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-tiny-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config.to_hf(), f, indent=2)
        with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(_tokenizer_json(config))
        keys = list(tensors)
        if shards == 1:
            save_file(tensors, os.path.join(tmp, SINGLE_FILE), metadata={"format": "pt"})
        else:
            per = -(-len(keys) // shards)
            weight_map = {}
            for i in range(shards):
                name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
                part = {k: tensors[k] for k in keys[i * per:(i + 1) * per]}
                save_file(part, os.path.join(tmp, name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(part, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
