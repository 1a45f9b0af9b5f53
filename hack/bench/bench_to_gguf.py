"""Writes the MoE bench checkpoint (`switchyard-worker make-checkpoint --shape bench`) as a
GGUF file llama.cpp loads, so the two engines can be timed on the same file.

llama.cpp's own converter (convert_hf_to_gguf.py) refuses this checkpoint: its generated
tokenizer has no merges and a pre-tokenizer whose hash the converter does not know. The
model itself is a plain Qwen3-MoE, so this script writes it directly with llama.cpp's
gguf-py (the copy vendored beside the converter): the `qwen3moe` metadata, llama.cpp's
tensor names, the experts stacked per layer as `[experts, rows, cols]`, and the
byte-level vocabulary (256 byte tokens and the specials, one merge; the rows past them
unused, as the embedding has 32 000). Benchmarks feed token ids, so the vocabulary only has
to load. Usage:

    python bench_to_gguf.py LLAMA_CPP_SRC CHECKPOINT_DIR OUT.gguf f32|bf16
"""

import json
import sys

import numpy as np


def main() -> None:
    src, ckpt, out, outtype = sys.argv[1:5]
    sys.path.insert(0, f"{src}/gguf-py")
    import gguf
    from safetensors.numpy import load_file

    cfg = json.load(open(f"{ckpt}/config.json"))
    tok = json.load(open(f"{ckpt}/tokenizer.json"))
    arch = "qwen3moe"
    w = gguf.GGUFWriter(out, arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_expert_count(cfg["num_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if outtype == "bf16" else gguf.LlamaFileType.ALL_F32)

    vocab = dict(tok["model"]["vocab"])
    specials = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    tokens = [f"<unused{i}>" for i in range(cfg["vocab_size"])]
    types = [gguf.TokenType.UNUSED] * cfg["vocab_size"]
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for text, i in specials.items():
        tokens[i], types[i] = text, gguf.TokenType.CONTROL
    # llama.cpp needs a merges list: one merge ("Ġ Ġ" → "ĠĠ") in the first unused row.
    spare = types.index(gguf.TokenType.UNUSED)
    tokens[spare], types[spare] = "ĠĠ", gguf.TokenType.NORMAL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ Ġ"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)

    t = load_file(f"{ckpt}/model.safetensors")

    def put(name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr.astype(np.float32))
        if outtype == "bf16" and arr.ndim >= 2:
            w.add_tensor(name, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(name, arr)

    put("token_embd.weight", t["model.embed_tokens.weight"])
    put("output_norm.weight", t["model.norm.weight"])
    put("output.weight", t["lm_head.weight"])
    parts = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp",
    }
    for layer in range(cfg["num_hidden_layers"]):
        for hf, g in parts.items():
            put(f"blk.{layer}.{g}.weight", t[f"model.layers.{layer}.{hf}.weight"])
        for proj, g in [("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")]:
            stacked = np.stack([t[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"]
                                for e in range(cfg["num_experts"])])
            put(f"blk.{layer}.{g}.weight", stacked)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
