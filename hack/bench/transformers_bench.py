"""The Python `transformers` side of `make bench-engine`: the same checkpoint, the same
prompts (token ids from the same formula as `switchyard-worker bench`), the same phases.

- prefill: one prompt of --prompt-len tokens through the model, tokens/s;
- decode at batch B: `generate` of B prompts with decode_len + 1 new tokens minus the same
  call with 1 new token (the prefill and first token), greedy, EOS ignored, each the best of
  two runs after a warm-up at that batch shape: tokens/s = B * decode_len / (difference).

Prints one JSON object on stdout (progress on stderr), in the schema the Rust side uses.
"""

import argparse
import json
import os
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def prompts(batch, offset, prompt_len, vocab):
    # Must match worker/src/engine/bench.rs.
    return torch.tensor(
        [[((offset + i) * 7919 + j * 104_729) % max(vocab, 2) for j in range(prompt_len)] for i in range(batch)],
        dtype=torch.long,
    )


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-len", type=int, default=32)
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = torch.float32 if a.dtype == "f32" else torch.bfloat16
    vocab = AutoConfig.from_pretrained(a.model).vocab_size
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).eval()
    figures = []
    with torch.inference_mode():
        x = prompts(1, 1, a.prompt_len, vocab)
        model(prompts(1, 0, 8, vocab))  # warm-up
        secs = timed(lambda: model(x), repeat=2)
        figures.append({"phase": "prefill", "batch": 1, "tokens_per_s": a.prompt_len / secs, "step_ms": secs * 1e3})
        print(f"prefill {a.prompt_len} tokens: {a.prompt_len / secs:.0f} tokens/s", file=sys.stderr)
        for b in [int(s) for s in a.batch.split(",")]:
            x = prompts(b, 100, a.prompt_len, vocab)
            mask = torch.ones_like(x)
            def gen(n):
                model.generate(
                    input_ids=x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=0, eos_token_id=None,
                )
            gen(2)  # warm-up at this batch shape (allocations, kernel selection)
            first = timed(lambda: gen(1), repeat=2)
            full = timed(lambda: gen(a.decode_len + 1), repeat=2)
            secs = max(full - first, 1e-9)
            tps = b * a.decode_len / secs
            figures.append({"phase": "decode", "batch": b, "tokens_per_s": tps, "step_ms": secs * 1e3 / a.decode_len})
            print(f"decode batch {b}: {tps:.1f} tokens/s", file=sys.stderr)
    print(json.dumps({
        "engine": "transformers",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": a.dtype,
        "figures": figures,
    }))


if __name__ == "__main__":
    main()
