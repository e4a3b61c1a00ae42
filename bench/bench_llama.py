"""Llama 2 speed against Hugging Face transformers on this CPU, float32, same weights.

    python bench/bench_llama.py [--quick] [--threads 2] [--out bench/results/llama.json]

1. Decoding with a KV cache: batch 1, 200 new tokens (greedy, no EOS), stories15m shape:
   our tokens/s against `LlamaForCausalLM.generate`, and whether both produce the same tokens.
2. Training: one step (forward, backward, AdamW) on an 8×256 batch, stories15m shape:
   tokens/s against Hugging Face computing its own loss from labels.
3. Our KV cache against recomputing the whole prefix (use_cache=False) at 200 new tokens:
   speed, and peak memory of each: the peak rise of the resident set size (RSS, sampled from
   /proc/self/statm) during one generation in a fresh process, beside the cache's own size and
   the packed copy of the weights that accelerated decoding keeps (`llama/fast.py`).
4. The matrix products of one decoding step (every weight of the model times one row) in three
   layouts: nn.Linear's (out, in), a contiguous transpose, and fast.py's column blocks.
5. The matrix products of one training step, MKL (PyTorch's default on a CPU) against oneDNN
   (`fromscratch.fast.gemm`): GFLOP/s of y = x·Wᵀ, ∂x = g·W and ∂W = gᵀ·x at the step's shapes; and
   the resident memory oneDNN keeps for each new shape it meets.

Our model runs with its opt-in fast paths (`fromscratch.llama.accelerate`), as `llama train` and
`llama generate` run it. Random weights are enough: the work per token does not depend on their values. Each timing is
the best of several interleaved repeats (the machine may be shared); the median is kept too.
"""

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from harness import interleaved, rates, speedup, write_results

from fromscratch.devices import describe_device
from fromscratch.fast.gemm import onednn_linear
from fromscratch.llama import Llama, LlamaConfig, accelerate
from fromscratch.llama.checkpoints import config_to_hf, meta_key_to_hf, meta_to_hf_permute
from fromscratch.llama.fast import column_blocks, n_column_blocks

PROMPT = [1, 9038, 2501, 263, 931]  # "<s> Once upon a time" in Llama 2's tokenizer


def huggingface_copy(model: Llama):
    """transformers' LlamaForCausalLM holding `model`'s weights (q/k rows permuted to its RoPE)."""
    import transformers

    config = model.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(config)))
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("attention.wq.weight"):
            tensor = meta_to_hf_permute(tensor, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = meta_to_hf_permute(tensor, config.kv_heads)
        state[meta_key_to_hf(name)] = tensor
    hf.load_state_dict(state, strict=False)  # a tied lm_head is the embedding
    hf.generation_config.eos_token_id = None  # never stop early
    hf.generation_config.pad_token_id = 0
    return hf


def bench_decode(model, hf, new_tokens: int, repeats: int) -> dict:
    prompt = torch.tensor([PROMPT])
    ours = lambda: model.generate(prompt, new_tokens, temperature=0)  # noqa: E731
    theirs = lambda: hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,  # noqa: E731
                                 do_sample=False)
    with torch.inference_mode():
        same = torch.equal(ours(), theirs())  # also the warm-up
        times = interleaved({"ours": ours, "theirs": theirs}, repeats)
    ours_rate, theirs_rate = rates(new_tokens, times["ours"]), rates(new_tokens, times["theirs"])
    return {
        "new_tokens": new_tokens, "batch_size": 1, "identical_tokens": same,
        "ours_tokens_per_s": ours_rate, "hf_tokens_per_s": theirs_rate, **speedup(ours_rate, theirs_rate),
    }


def bench_train(model, hf, batch_size: int, seq_len: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, (batch_size, seq_len + 1), generator=generator)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    # Fused AdamW for both: what our engine trains with, and Hugging Face Trainer's default
    # ("adamw_torch_fused").
    ours_opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
    model.train()
    hf.train()

    def ours():
        loss = model(inputs, targets=targets)
        ours_opt.zero_grad(set_to_none=True)
        loss.backward()
        ours_opt.step()

    def theirs():  # HF shifts labels itself, so it gets the T inputs as labels
        loss = hf(input_ids=inputs, labels=inputs).loss
        hf_opt.zero_grad(set_to_none=True)
        loss.backward()
        hf_opt.step()

    times = interleaved({"ours": ours, "theirs": theirs}, repeats, warmup=1)  # AdamW allocates its state
    tokens = batch_size * seq_len
    ours_rate, theirs_rate = rates(tokens, times["ours"]), rates(tokens, times["theirs"])
    return {
        "batch": [batch_size, seq_len], "optimizer": "torch.optim.AdamW(fused=True) for both",
        "ours_tokens_per_s": ours_rate, "hf_tokens_per_s": theirs_rate, **speedup(ours_rate, theirs_rate),
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_probe(use_cache: bool, new_tokens: int, threads: int) -> dict:
    """Run in a fresh process: the peak rise of resident memory during one generation, sampled
    every 0.2 ms from /proc/self/statm, above the resident memory just before it."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = accelerate(Llama(LlamaConfig.from_preset("stories15m")).eval())
    prompt = torch.tensor([PROMPT])
    model.generate(prompt, 2, temperature=0, use_cache=use_cache)  # thread pools, first-call buffers
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the baseline is what is live
    baseline, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
    done.set()
    sampler.join()
    cache_bytes = model.new_cache(1, len(PROMPT) + new_tokens).nbytes if use_cache else 0
    result = {"peak_rss_rise_mib": round((max(peak[0], baseline) - baseline) / 2**20, 2),
              "kv_cache_mib": round(cache_bytes / 2**20, 2)}
    if use_cache:  # made by the warm-up call, so inside the baseline: reported on its own
        packed = model.decode_step.packed
        tensors = [packed.output] + [t for layer in packed.layers
                                     for t in (layer.wqkv, layer.wo, layer.feed_forward.w13, layer.feed_forward.w2)]
        result["packed_weights_mib"] = round(sum(t.nbytes for t in tensors) / 2**20, 2)
    return result


def bench_kv_cache(model, new_tokens: int, repeats: int, threads: int) -> dict:
    prompt = torch.tensor([PROMPT])
    cached = lambda: model.generate(prompt, new_tokens, temperature=0, use_cache=True)  # noqa: E731
    uncached = lambda: model.generate(prompt, new_tokens, temperature=0, use_cache=False)  # noqa: E731
    assert torch.equal(cached(), uncached())
    times = interleaved({"cached": cached, "uncached": uncached}, repeats)
    memory = {}
    for name in ("cached", "uncached"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-probe", name, "--new-tokens", str(new_tokens),
             "--threads", str(threads)], capture_output=True, text=True, check=True)
        memory[name] = json.loads(out.stdout.strip().splitlines()[-1])
    cached_rate, uncached_rate = rates(new_tokens, times["cached"]), rates(new_tokens, times["uncached"])
    return {
        "new_tokens": new_tokens, "cached_tokens_per_s": cached_rate, "uncached_tokens_per_s": uncached_rate,
        "speedup_best": round(cached_rate["best"] / uncached_rate["best"], 2),
        "memory": memory,
        "memory_method": "peak rise of resident set size (/proc/self/statm, sampled every 0.2 ms) "
                         "during one generation, in a fresh process, above the RSS just before it",
    }


def bench_decode_layouts(model, repeats: int) -> dict:
    """ms per token for the products of one decoding step, in a cycle over all the weights as a
    real step does (so they come from DRAM, not cache), and the bandwidth that implies."""
    config = model.config
    matrices = []
    for block in model.layers:
        attention, ffn = block.attention, block.feed_forward
        matrices += [torch.cat([attention.wq.weight, attention.wk.weight, attention.wv.weight]),
                     attention.wo.weight, torch.cat([ffn.w1.weight, ffn.w3.weight]), ffn.w2.weight]
    matrices = [m.detach() for m in matrices] + [model.output.weight.detach()]
    total_bytes = sum(m.nbytes for m in matrices)
    inputs = {d: torch.randn(1, d) for d in (config.d_model, config.hidden_dim)}
    layouts = {
        "nn.Linear (out, in)": [(inputs[m.size(1)], m) for m in matrices],
        "transposed (in, out)": [(inputs[m.size(1)], m.t().contiguous()) for m in matrices],
        "column blocks + bmm": [(inputs[m.size(1)], column_blocks(m, n_column_blocks(m.size(0))))
                                for m in matrices],
    }
    products = {
        "nn.Linear (out, in)": lambda x, w: torch.nn.functional.linear(x, w),
        "transposed (in, out)": lambda x, w: x @ w,
        "column blocks + bmm": lambda x, w: torch.bmm(x.expand(w.size(0), *x.shape), w),
    }
    results = {"weights_mb": round(total_bytes / 1e6, 1)}
    with torch.inference_mode():
        for name, pairs in layouts.items():
            product = products[name]

            def one_token():
                for x, w in pairs:
                    product(x, w)

            one_token()
            seconds = min(interleaved({name: lambda: [one_token() for _ in range(20)]}, repeats)[name]) / 20
            results[name] = {"ms_per_token": round(seconds * 1e3, 2), "gb_per_s": round(total_bytes / seconds / 1e9, 1)}
    return results


def bench_gemm(model, tokens: int, repeats: int) -> dict:
    config = model.config
    shapes = {  # (in, out) of each product in a step: the layers' matrices, and a chunk of the classifier
        "wq/wo (288→288)": (tokens, config.d_model, config.d_model),
        "w1/w3 (288→768)": (tokens, config.d_model, config.hidden_dim),
        "w2 (768→288)": (tokens, config.hidden_dim, config.d_model),
        "classifier chunk (256 rows, 288→32000)": (256, config.d_model, config.vocab_size),
    }
    results = {}
    for name, (rows, d_in, d_out) in shapes.items():
        x, weight, g = torch.randn(rows, d_in), torch.randn(d_out, d_in), torch.randn(rows, d_out)
        products = {
            "forward x·Wᵀ": (lambda: x @ weight.t(), lambda: onednn_linear(x, weight)),
            "input grad g·W": (lambda: g @ weight, lambda: onednn_linear(g, weight.t())),
            "weight grad gᵀ·x": (lambda: g.t() @ x, lambda: onednn_linear(g.t(), x.t())),
        }
        flops = 2 * rows * d_in * d_out
        for product, (mkl, onednn) in products.items():
            times = interleaved({"mkl": mkl, "onednn": onednn}, repeats, warmup=1)
            results[f"{name}: {product}"] = {
                "mkl_gflops": round(flops / min(times["mkl"]) / 1e9), "onednn_gflops": round(flops / min(times["onednn"]) / 1e9)}
    out = subprocess.run([sys.executable, __file__, "--memory-probe", "onednn", "--threads", str(torch.get_num_threads())],
                         capture_output=True, text=True, check=True)
    results.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def onednn_shape_memory() -> dict:
    """Run in a fresh process: what each new shape costs in resident memory, since oneDNN builds
    and keeps a kernel per shape (gemm.py's reason for MAX_ONEDNN_SHAPES). 100 products of unseen
    shapes (rows 1000..1099 times a 288 → 768 weight), after one to start the library."""
    weight = torch.randn(768, 288)
    onednn_linear(torch.randn(999, 288), weight)
    before = _rss_bytes()
    for rows in range(1000, 1100):
        onednn_linear(torch.randn(rows, 288), weight)
    return {"onednn_memory_per_new_shape_mb": round((_rss_bytes() - before) / 100 / 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens, a smaller batch, one repeat")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "llama.json"))
    parser.add_argument("--memory-probe", choices=["cached", "uncached", "onednn"], help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe == "onednn":
        torch.set_num_threads(args.threads)
        print(json.dumps(onednn_shape_memory()))
        return
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe == "cached", args.new_tokens, args.threads)))
        return

    import transformers

    torch.set_num_threads(args.threads)
    new_tokens, (batch_size, seq_len), repeats = (50, (2, 64), 1) if args.quick else (200, (8, 256), 8)
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("stories15m")).eval()
    hf = huggingface_copy(model).eval()
    accelerate(model)
    results = {
        "environment": {
            "cpu": platform.processor() or platform.machine(), "hardware": describe_device("cpu"),
            "cpu_count": os.cpu_count(),
            "threads": args.threads, "dtype": "float32", "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "model": "stories15m shape (d_model 288, 6 layers, 6 heads, vocab 32000), random weights",
            "quick": args.quick,
        }
    }
    print(f"decoding {new_tokens} tokens ...", file=sys.stderr)
    results["decode"] = bench_decode(model, hf, new_tokens, repeats)
    print(f"training on {batch_size}×{seq_len} ...", file=sys.stderr)
    results["train"] = bench_train(model, hf, batch_size, seq_len, repeats)
    model.eval()
    print("KV cache against recomputation ...", file=sys.stderr)
    results["kv_cache"] = bench_kv_cache(model, new_tokens, max(1, repeats - 2), args.threads)
    print("decoding products in three layouts ...", file=sys.stderr)
    results["decode_layouts"] = bench_decode_layouts(model, repeats)
    print("matrix products: MKL against oneDNN ...", file=sys.stderr)
    results["gemm"] = bench_gemm(model, batch_size * seq_len, repeats)
    results["environment"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    write_results(results, args.out, echo=True)


if __name__ == "__main__":
    main()
