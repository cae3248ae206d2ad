"""Tiny random transformers models for the HF tests (built from config classes, weights from
``torch.manual_seed``), one per cache shape worth testing, and their prompts. Small enough that
the whole compatibility matrix runs in well under a minute on 2 CPU cores.

eos_token_id=None everywhere: generation never stops early, so every run makes max_new_tokens.
"""

from __future__ import annotations

from typing import Callable

import torch
import transformers

VOCAB = 128
_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, eos_token_id=None,
              bos_token_id=None, pad_token_id=0)


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    gc = model.generation_config
    gc.eos_token_id = None
    gc.pad_token_id = 0
    if model.config.is_encoder_decoder:
        gc.decoder_start_token_id = 1
    return model.eval()


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=2, **_SMALL))


def mistral():
    """Every layer slides (window shorter than prompt + generation)."""
    return transformers.MistralForCausalLM(
        transformers.MistralConfig(num_hidden_layers=2, sliding_window=6, **_SMALL))


def gemma3():
    """Sliding and full layers interleaved (sliding_window_pattern 2)."""
    cfg = transformers.Gemma3TextConfig(num_hidden_layers=2, head_dim=8, sliding_window=6,
                                        layer_types=["sliding_attention", "full_attention"],
                                        **_SMALL)
    return transformers.Gemma3ForCausalLM(cfg)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2,
                                  n_head=4, eos_token_id=None, bos_token_id=None,
                                  pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def mixtral():
    cfg = transformers.MixtralConfig(num_hidden_layers=2, num_local_experts=4,
                                     num_experts_per_tok=2, **_SMALL)
    return transformers.MixtralForCausalLM(cfg)


def qwen3_next():
    """Hybrid: linear-attention (gated delta net) layers around a full-attention one."""
    cfg = transformers.Qwen3NextConfig(
        num_hidden_layers=3, head_dim=8, linear_conv_kernel_dim=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, decoder_sparse_step=1,
        layer_types=["linear_attention", "full_attention", "linear_attention"], **_SMALL)
    return transformers.Qwen3NextForCausalLM(cfg)


def deepseek_v3():
    """Multi-head latent attention (keys and values of different head sizes) and MoE."""
    cfg = transformers.DeepseekV3Config(
        num_hidden_layers=2, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, n_routed_experts=4,
        n_shared_experts=1, moe_intermediate_size=32, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1,
        **{k: v for k, v in _SMALL.items() if k != "num_key_value_heads"})
    return transformers.DeepseekV3ForCausalLM(cfg)


def nemotron_h():
    """Mamba, attention and mlp/moe blocks: the mlp/moe ones have DummyLayer caches."""
    cfg = transformers.NemotronHConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
        layers_block_type=["mamba", "mlp", "attention", "moe"], ssm_state_size=8,
        mamba_num_heads=4, mamba_head_dim=16, n_groups=1, conv_kernel=4, expand=2,
        chunk_size=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32,
        eos_token_id=None, bos_token_id=None, pad_token_id=0)
    return transformers.NemotronHForCausalLM(cfg)


def bart():
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2,
                                  decoder_layers=2, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=128,
                                  eos_token_id=None, bos_token_id=None, pad_token_id=0,
                                  forced_eos_token_id=None, decoder_start_token_id=1)
    return transformers.BartForConditionalGeneration(cfg)


def t5():
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_decoder_layers=2, num_heads=4, eos_token_id=None,
                                pad_token_id=0, decoder_start_token_id=1)
    return transformers.T5ForConditionalGeneration(cfg)


FACTORIES: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": llama, "mistral": mistral, "gemma3": gemma3, "gpt2": gpt2, "mixtral": mixtral,
    "qwen3_next": qwen3_next, "deepseek_v3": deepseek_v3, "nemotron_h": nemotron_h,
    "bart": bart, "t5": t5}
_BUILT: dict[str, torch.nn.Module] = {}


def model(name: str) -> torch.nn.Module:
    """The tiny model ``name``, built once per process (seeded: the same weights each time)."""
    if name not in _BUILT:
        torch.manual_seed(sorted(FACTORIES).index(name))
        _BUILT[name] = _finish(FACTORIES[name]())
    return _BUILT[name]


def prompts(batch: int, length: int, seed: int, padded: bool = False,
            vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """Random prompts (never token 0, the pad). ``padded``: left padding of different lengths
    per row, with the attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        for row in range(batch):
            pad = row * 2 % length
            ids[row, :pad] = 0
            mask[row, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}
