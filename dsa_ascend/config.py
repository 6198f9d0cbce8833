"""Model configuration (HF ``config.json`` keys -> the paper's names) and run configuration.

``ModelConfig`` is what the checkpoint says the network is; ``RunConfig`` is how this process runs
it (backend, device, dtype, cache sizes, numerical modes). Keeping the two apart lets one
checkpoint run on every backend without editing its files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A config.json or run option that is missing, unknown or inconsistent."""


# HF key -> our field name, for the keys every DeepSeek-V3.2-Exp config.json carries.
_HF_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "intermediate_size": "inter_dim",
    "moe_intermediate_size": "moe_inter_dim",
    "num_hidden_layers": "n_layers",
    "first_k_dense_replace": "n_dense_layers",
    "num_attention_heads": "n_heads",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "n_activated_experts",
    "n_group": "n_expert_groups",
    "topk_group": "n_limited_groups",
    "routed_scaling_factor": "route_scale",
    "scoring_func": "score_func",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim",
    "index_topk": "index_topk",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
}
_OPTIONAL_HF_KEYS = {
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "indexer_rope_interleave": "indexer_rope_interleave",
    "num_nextn_predict_layers": "n_mtp_layers",
}


@dataclass(frozen=True)
class YarnConfig:
    factor: float
    original_seq_len: int
    beta_fast: float
    beta_slow: float
    mscale: float  # rope_scaling.mscale_all_dim (the official reference calls it mscale)


@dataclass(frozen=True)
class QuantConfig:
    """``quantization_config`` of a quantized checkpoint.

    method "fp8": e4m3 weights with 128x128 block scales (``weight_scale_inv``), the release.
    method "w8a8_int8": symmetric int8 weights with one float32 scale per output channel
    (``weight_scale`` [out]); activations are quantized per token at run time (dsa.int8_linear).
    Written by ``dsa_ascend.convert``; see ``INT8_QUANTIZATION_CONFIG``.
    ``ue8m0`` is the scale format of the FP8 *activation* quantizations that remain in both
    (indexer q/k, simulated latent cache, FP8 GEMM inputs).
    """

    block: tuple[int, int] = (128, 128)
    ue8m0: bool = True  # scale_fmt "ue8m0": activation scales rounded up to powers of two
    method: str = "fp8"


# The quantization_config that dsa_ascend.convert writes for int8 W8A8 checkpoints.
INT8_QUANTIZATION_CONFIG = {
    "quant_method": "w8a8_int8",
    "weight_dtype": "int8",           # symmetric, q in [-127, 127]
    "weight_granularity": "per_channel",  # "<linear>.weight_scale" float32 [out_features]
    "activation_scheme": "dynamic",   # int8 per token, scale = amax / 127, at run time
    "activation_granularity": "per_token",
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    inter_dim: int
    moe_inter_dim: int
    n_layers: int
    n_dense_layers: int
    n_heads: int
    n_routed_experts: int
    n_shared_experts: int
    n_activated_experts: int
    n_expert_groups: int
    n_limited_groups: int
    route_scale: float
    score_func: str
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    yarn: Optional[YarnConfig] = None
    quant: Optional[QuantConfig] = None
    indexer_rope_interleave: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    n_mtp_layers: int = 0
    # Top-level "scale_fmt" (the name of DeepSeek's inference config): the FP8 activation scale
    # format of a checkpoint WITHOUT a quantization_config (a bf16 conversion of the release
    # keeps "ue8m0" here so the indexer and latent quantization stay those of the original).
    scale_fmt: Optional[str] = None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Per-token MLA cache entry: latent + rope key (576 for the release)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def ue8m0(self) -> bool:
        """Scale format of every FP8 activation quantization (indexer, latent, GEMM inputs)."""
        if self.quant is not None:
            return self.quant.ue8m0
        return self.scale_fmt == "ue8m0"

    def softmax_scale(self) -> float:
        """(qk_nope + qk_rope)^-0.5, times mscale^2 under YaRN (DSA_SPEC §3, HF convention)."""
        scale = self.qk_head_dim ** -0.5
        if self.yarn is not None:
            m = 0.1 * self.yarn.mscale * math.log(self.yarn.factor) + 1.0
            scale *= m * m
        return scale

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        missing = [k for k in _HF_KEYS if k not in hf]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {missing}")
        kw: dict[str, Any] = {ours: hf[theirs] for theirs, ours in _HF_KEYS.items()}
        for theirs, ours in _OPTIONAL_HF_KEYS.items():
            if hf.get(theirs) is not None:
                kw[ours] = hf[theirs]
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        kw["yarn"] = _parse_rope_scaling(hf.get("rope_scaling"), source)
        kw["quant"] = _parse_quantization(hf.get("quantization_config"), source)
        scale_fmt = hf.get("scale_fmt")
        if scale_fmt not in (None, "ue8m0"):
            raise ConfigError(f"{source}: scale_fmt = {scale_fmt!r} is not supported (ue8m0 or "
                              "absent)")
        if scale_fmt is not None and kw["quant"] is not None and not kw["quant"].ue8m0:
            raise ConfigError(f"{source}: scale_fmt = {scale_fmt!r} disagrees with "
                              "quantization_config (no scale_fmt there)")
        kw["scale_fmt"] = scale_fmt
        int_fields = {f.name for f in dataclasses.fields(cls) if f.type == "int"}
        for name in int_fields & kw.keys():
            value = kw[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{source}: {_hf_name(name)} must be an integer, got {value!r}")
        for name in ("route_scale", "rope_theta", "rms_norm_eps"):
            if isinstance(kw[name], bool) or not isinstance(kw[name], (int, float)):
                raise ConfigError(f"{source}: {_hf_name(name)} must be a number, got {kw[name]!r}")
            kw[name] = float(kw[name])
        cfg = cls(**kw)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        try:
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json there") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(hf, source=path)

    def validate(self, source: str = "config") -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{source}: {key} {msg}")

        for name in ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads",
                     "n_routed_experts", "n_activated_experts", "n_expert_groups",
                     "n_limited_groups", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim", "index_n_heads", "index_head_dim",
                     "index_topk", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise bad(_hf_name(name), f"must be positive, got {getattr(self, name)}")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise bad("first_k_dense_replace", f"= {self.n_dense_layers} must lie in "
                      f"[0, num_hidden_layers={self.n_layers}]")
        if self.n_shared_experts < 0:
            raise bad("n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
        if self.score_func != "sigmoid":
            raise bad("scoring_func", f"= {self.score_func!r} is not supported "
                      "(DeepSeek-V3.2 routes with 'sigmoid')")
        if self.n_routed_experts % self.n_expert_groups:
            raise bad("n_routed_experts", f"= {self.n_routed_experts} is not divisible by "
                      f"n_group = {self.n_expert_groups}")
        if self.n_limited_groups > self.n_expert_groups:
            raise bad("topk_group", f"= {self.n_limited_groups} exceeds n_group = "
                      f"{self.n_expert_groups}")
        per_group = self.n_routed_experts // self.n_expert_groups
        if self.n_expert_groups > 1 and per_group < 2:
            raise bad("n_group", "needs at least 2 experts per group (group score = top-2 sum)")
        if self.n_activated_experts > per_group * self.n_limited_groups:
            raise bad("num_experts_per_tok", f"= {self.n_activated_experts} exceeds the "
                      f"{per_group * self.n_limited_groups} experts of topk_group groups")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", f"must be even, got {self.qk_rope_head_dim}")
        d = self.index_head_dim
        if d & (d - 1) or d < self.qk_rope_head_dim:
            raise bad("index_head_dim", f"= {d} must be a power of two (Hadamard rotation) "
                      f">= qk_rope_head_dim = {self.qk_rope_head_dim}")
        if d % 128 and d > 128:
            raise bad("index_head_dim", f"= {d}: FP8 blocks are 128 channels")
        if self.kv_lora_rank % 128 and self.kv_lora_rank > 128:
            raise bad("kv_lora_rank", f"= {self.kv_lora_rank} must be a multiple of 128 "
                      "(FP8 latent blocks)")
        if not self.rms_norm_eps > 0:
            raise bad("rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        if not 0 <= self.bos_token_id < self.vocab_size:
            raise bad("bos_token_id", f"= {self.bos_token_id} outside the vocabulary")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise bad("eos_token_id", f"= {self.eos_token_id} outside the vocabulary")
        if self.yarn is not None and self.yarn.original_seq_len > self.max_position_embeddings:
            raise bad("rope_scaling.original_max_position_embeddings",
                      f"= {self.yarn.original_seq_len} exceeds max_position_embeddings = "
                      f"{self.max_position_embeddings}")

    def to_hf(self) -> dict[str, Any]:
        """The config.json this config was (or would be) read from."""
        hf: dict[str, Any] = {
            "architectures": ["DeepseekV32ForCausalLM"],
            "model_type": "deepseek_v32",
        }
        for theirs, ours in {**_HF_KEYS, **_OPTIONAL_HF_KEYS}.items():
            hf[theirs] = getattr(self, ours)
        hf.update(num_key_value_heads=self.n_heads, hidden_act="silu", norm_topk_prob=True,
                  topk_method="noaux_tc", moe_layer_freq=1, tie_word_embeddings=False,
                  attention_bias=False, torch_dtype="bfloat16")
        if self.yarn is not None:
            y = self.yarn
            hf["rope_scaling"] = {"type": "yarn", "factor": y.factor,
                                  "original_max_position_embeddings": y.original_seq_len,
                                  "beta_fast": y.beta_fast, "beta_slow": y.beta_slow,
                                  "mscale": y.mscale, "mscale_all_dim": y.mscale}
        if self.quant is not None and self.quant.method == "w8a8_int8":
            hf["quantization_config"] = {**INT8_QUANTIZATION_CONFIG,
                                         **({"scale_fmt": "ue8m0"} if self.quant.ue8m0 else {})}
        elif self.quant is not None:
            hf["quantization_config"] = {
                "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(self.quant.block),
                **({"scale_fmt": "ue8m0"} if self.quant.ue8m0 else {})}
        if self.scale_fmt is not None:
            hf["scale_fmt"] = self.scale_fmt
        return hf


def _hf_name(field_name: str) -> str:
    for theirs, ours in {**_HF_KEYS, **_OPTIONAL_HF_KEYS}.items():
        if ours == field_name:
            return theirs
    return field_name


def _parse_rope_scaling(rs: Any, source: str) -> Optional[YarnConfig]:
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ConfigError(f"{source}: rope_scaling must be an object, got {rs!r}")
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"{source}: rope_scaling.type = {kind!r} is not supported (only 'yarn')")
    need = ("factor", "original_max_position_embeddings")
    missing = [k for k in need if k not in rs]
    if missing:
        raise ConfigError(f"{source}: rope_scaling is missing {missing}")
    mscale = rs.get("mscale_all_dim", rs.get("mscale", 1.0))
    # HF scales cos/sin by get_mscale(mscale) / get_mscale(mscale_all_dim); the release sets both
    # to 1.0 and the official reference ignores the ratio, so a config where they differ would
    # make the two conventions disagree: refuse it rather than pick one silently.
    if "mscale" in rs and "mscale_all_dim" in rs and rs["mscale"] != rs["mscale_all_dim"]:
        raise ConfigError(f"{source}: rope_scaling.mscale = {rs['mscale']} differs from "
                          f"mscale_all_dim = {rs['mscale_all_dim']}; not supported")
    y = YarnConfig(factor=float(rs["factor"]),
                   original_seq_len=int(rs["original_max_position_embeddings"]),
                   beta_fast=float(rs.get("beta_fast", 32)), beta_slow=float(rs.get("beta_slow", 1)),
                   mscale=float(mscale))
    if y.factor < 1:
        raise ConfigError(f"{source}: rope_scaling.factor must be >= 1, got {y.factor}")
    if y.original_seq_len <= 0:
        raise ConfigError(f"{source}: rope_scaling.original_max_position_embeddings must be "
                          f"positive, got {y.original_seq_len}")
    return y


def _parse_quantization(qc: Any, source: str) -> Optional[QuantConfig]:
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ConfigError(f"{source}: quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if method == "w8a8_int8":
        return _parse_int8_quantization(qc, source)
    if method != "fp8":
        raise ConfigError(f"{source}: quantization_config.quant_method = {method!r} is not "
                          "supported ('fp8' or 'w8a8_int8')")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"{source}: quantization_config.fmt = {fmt!r} is not supported (e4m3)")
    block = tuple(qc.get("weight_block_size", (128, 128)))
    if block != (128, 128):
        raise ConfigError(f"{source}: quantization_config.weight_block_size = {list(block)} is "
                          "not supported ([128, 128])")
    scale_fmt = qc.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise ConfigError(f"{source}: quantization_config.scale_fmt = {scale_fmt!r} is not "
                          "supported (ue8m0 or absent)")
    return QuantConfig(block=(128, 128), ue8m0=scale_fmt == "ue8m0")


def _parse_int8_quantization(qc: dict, source: str) -> QuantConfig:
    for key, want in INT8_QUANTIZATION_CONFIG.items():
        if qc.get(key, want) != want:
            raise ConfigError(f"{source}: quantization_config.{key} = {qc[key]!r} is not "
                              f"supported for w8a8_int8 ({want!r})")
    scale_fmt = qc.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise ConfigError(f"{source}: quantization_config.scale_fmt = {scale_fmt!r} is not "
                          "supported (ue8m0 or absent)")
    return QuantConfig(ue8m0=scale_fmt == "ue8m0", method="w8a8_int8")


# ---------------------------------------------------------------------------------- presets
_RELEASE_671B = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "first_k_dense_replace": 3,
    "num_attention_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "index_n_heads": 64, "index_head_dim": 128,
    "index_topk": 2048, "rope_theta": 10000, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 163840, "bos_token_id": 0, "eos_token_id": 1,
    "num_nextn_predict_layers": 1,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
}

# Same structure, small sizes. The kernel-facing widths stay at release values (latent 512 +
# rope 64 = 576, indexer head 128) so every kernel that runs the 671B model runs this one.
# YaRN is active (original 1024 < max 40960) and index_topk is small so sparsity is exercised.
_TINY = {
    **_RELEASE_671B,
    "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
    "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4,
    "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
    "q_lora_rank": 128, "index_n_heads": 8, "index_topk": 16, "max_position_embeddings": 40960,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 1024,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}

# The release's widths (dim 7168, 128 heads, 576-wide latent, 64 x 128 indexer, 2048-wide
# experts, index_topk 2048) with 4 layers, 8 experts and a 32K vocabulary, stored bf16 like a
# bf16 conversion (scale_fmt ue8m0): ~2.9B parameters, ~5.7 GB. Multi-device benchmarks
# (tools/bench_distributed.py) on one or two GPUs.
_MEDIUM = {
    **_RELEASE_671B,
    "vocab_size": 32768, "num_hidden_layers": 4, "first_k_dense_replace": 1,
    "n_routed_experts": 8, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
    "quantization_config": None, "scale_fmt": "ue8m0",
}

PRESETS: dict[str, dict[str, Any]] = {"tiny": _TINY, "medium": _MEDIUM, "671b": _RELEASE_671B}


def preset(name: str) -> ModelConfig:
    try:
        hf = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
    return ModelConfig.from_hf(json.loads(json.dumps(hf)), source=f"preset {name!r}")


# ------------------------------------------------------------------------------ run config
INDEXER_DTYPES = ("auto", "fp8", "bf16", "int8")


@dataclass
class RunConfig:
    """How this process runs a checkpoint. Every field has a safe default.

    backend         "reference" | "cuda" | "npu" | None (best available for ``device``)
    block_size      tokens per page of the paged cache
    indexer_dtype   "fp8": Hadamard + FP8 block quantization as the official reference;
                    "bf16": keys stored in the model dtype, no rotation, no quantization;
                    "int8": Hadamard + symmetric int8 (q per token and head, k per token; the
                    Ascend 910B/C path, which has no FP8); "auto": the backend's preferred
                    mode (fp8 on reference/cuda, bf16 on npu; see backends.indexer_dtype)
    mla_form        "absorbed" (MQA form over the 576-wide latent, what sparse kernels compute)
                    or "mha" (per-head keys/values expanded from the latent; testing / reference)
    simulate_fp8_latent   round the cached latent through FP8 (128-blocks) as the official
                    reference does to mimic its deployed FP8 KV cache
    kv_cache_dtype  "auto": the latent cache holds the model dtype; "fp8": it holds the FP8
                    format of ``dsa_ascend.kv_fp8`` (656 bytes a token instead of 1152 in bf16:
                    the same FP8 latent values as ``simulate_fp8_latent``, the rope key in bf16)
    fp8_act_quant   FP8-weight linears quantize their input per token per 128 channels, as the
                    official fp8_gemm path does ("auto" = when the checkpoint is FP8)
    debug_parallel  multi-device runs: check that every rank selected the same top-k indices in
                    every layer (an all-gather per layer; also env DSA_DEBUG_PARALLEL=1)
    """

    backend: Optional[str] = None
    device: str = "cpu"
    dtype: Any = None  # torch.dtype; None -> torch.bfloat16
    max_seq_len: int = 4096
    max_batch_size: int = 8
    block_size: int = 64
    indexer_dtype: str = "auto"
    mla_form: str = "absorbed"
    simulate_fp8_latent: bool = True
    kv_cache_dtype: str = "auto"
    fp8_act_quant: Any = "auto"
    prefill_chunk_size: int = 2048
    debug_parallel: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("max_seq_len", "max_batch_size", "block_size", "prefill_chunk_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.indexer_dtype not in INDEXER_DTYPES:
            raise ConfigError(f"indexer_dtype must be one of {'|'.join(INDEXER_DTYPES)}, got "
                              f"{self.indexer_dtype!r}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ConfigError(f"kv_cache_dtype must be 'auto' or 'fp8', got {self.kv_cache_dtype!r}")
        if self.mla_form not in ("absorbed", "mha"):
            raise ConfigError(f"mla_form must be 'absorbed' or 'mha', got {self.mla_form!r}")
        if self.fp8_act_quant not in ("auto", True, False):
            raise ConfigError(f"fp8_act_quant must be 'auto', True or False, "
                              f"got {self.fp8_act_quant!r}")


def model_config_from_dir(path: str) -> ModelConfig:
    return ModelConfig.from_file(os.path.join(path, "config.json"))
