"""Benchmark of fromscratch's Transformer (Vaswani et al. 2017) on this machine's CPU.

1. Training throughput: forward + backward + Adam step of our model and of torch.nn.Transformer
   of the same size, inside the very same embeddings, positional encoding and tied output head.
   Both run with the config's dropout, padded sources, a causal target mask. Ratio = ours / PyTorch.
2. Decoding: greedy decoding of exactly 64 new tokens (EOS ignored), incremental with the
   key/value cache versus recomputing the whole prefix at every step. Ratio = cached / uncached.

The measurements alternate between the contenders, round after round, and report the median
round, so that a noisy neighbour on the machine slows both alike.

    python bench/bench_transformer.py            # the real run, a few minutes
    python bench/bench_transformer.py --quick    # a smoke run, seconds

Writes bench/results/transformer.json.
"""

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromscratch.transformer.decoding import greedy_decode
from fromscratch.transformer.model import Transformer, TransformerConfig

RESULTS = Path(__file__).resolve().parent / "results" / "transformer.json"


class PyTorchTransformer(nn.Module):
    """torch.nn.Transformer between our embeddings and output head (built by a 0-layer model of ours)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.shell = Transformer(replace(config, n_encoder_layers=0, n_decoder_layers=0))
        self.core = nn.Transformer(
            config.d_model, config.n_heads, config.n_encoder_layers, config.n_decoder_layers, config.d_ff,
            dropout=config.dropout, layer_norm_eps=config.norm_eps, batch_first=True, norm_first=config.norm_first,
        )
        if not config.norm_first:  # post-norm stacks have no final LayerNorm in the paper (nor in ours)
            self.core.encoder.norm, self.core.decoder.norm = nn.Identity(), nn.Identity()

    def forward(self, src_ids, tgt_ids):
        shell = self.shell
        padding = src_ids == shell.config.pad_id
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_ids.size(1))
        hidden = self.core(
            shell.embed(src_ids, shell.src_embedding), shell.embed(tgt_ids, shell.tgt_embedding),
            src_key_padding_mask=padding, memory_key_padding_mask=padding, tgt_mask=causal, tgt_is_causal=True,
        )
        return shell.output_projection(hidden)


def batch(config, batch_size, src_len, tgt_len, generator):
    src = torch.randint(3, config.vocab_size, (batch_size, src_len), generator=generator)
    lengths = torch.randint(src_len // 2, src_len + 1, (batch_size,), generator=generator)
    src[torch.arange(src_len)[None, :] >= lengths[:, None]] = config.pad_id
    tgt = torch.randint(3, config.vocab_size, (batch_size, tgt_len + 1), generator=generator)
    return src, tgt[:, :-1], tgt[:, 1:]


def train_step(model, optimizer, data):
    src, tgt_in, target = data
    logits = model(src, tgt_in)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def alternate(contenders: dict, rounds: int, warmup: int = 1) -> dict:
    """Seconds per call of each contender: median over `rounds`, calls interleaved."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_training(config, batch_size, src_len, tgt_len, rounds):
    torch.manual_seed(0)
    ours, theirs = Transformer(config).train(), PyTorchTransformer(config).train()
    n_params = {
        "ours": sum(p.numel() for p in ours.parameters()),
        "pytorch": sum(p.numel() for p in theirs.parameters()),
    }
    assert n_params["ours"] == n_params["pytorch"], n_params  # the same model, twice
    data = batch(config, batch_size, src_len, tgt_len, torch.Generator().manual_seed(0))
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-4)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=1e-4)
    seconds = alternate(
        {"ours": lambda: train_step(ours, opt_ours, data), "pytorch": lambda: train_step(theirs, opt_theirs, data)},
        rounds,
    )
    tokens = batch_size * (src_len + tgt_len)  # source + target positions per step
    return {
        "config": config.to_dict(),
        "parameters": n_params["ours"],
        "batch_size": batch_size,
        "src_len": src_len,
        "tgt_len": tgt_len,
        "tokens_per_step": tokens,
        "seconds_per_step": seconds,
        "tokens_per_second": {name: tokens / s for name, s in seconds.items()},
        "ratio_ours_over_pytorch": seconds["pytorch"] / seconds["ours"],
    }


def bench_decoding(config, batch_size, src_len, new_tokens, rounds):
    torch.manual_seed(0)
    model = Transformer(config).eval()
    src, _, _ = batch(config, batch_size, src_len, 1, torch.Generator().manual_seed(1))

    def decode(use_cache):
        out = greedy_decode(model, src, new_tokens, use_cache=use_cache, stop_at_eos=False)
        assert out.shape == (batch_size, new_tokens)
        return out

    assert torch.equal(decode(True), decode(False))
    seconds = alternate({"cached": lambda: decode(True), "uncached": lambda: decode(False)}, rounds, warmup=0)
    return {
        "config": config.to_dict(),
        "batch_size": batch_size,
        "src_len": src_len,
        "new_tokens": new_tokens,
        "seconds": seconds,
        "new_tokens_per_second": {name: batch_size * new_tokens / s for name, s in seconds.items()},
        "speedup_cached_over_uncached": seconds["uncached"] / seconds["cached"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--train-preset", default="base")
    parser.add_argument("--decode-preset", default="base")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.quick:
        train_config = decode_config = TransformerConfig.from_preset("tiny", vocab_size=1000)
        train_shape, train_rounds = dict(batch_size=8, src_len=16, tgt_len=16), 2
        decode_shapes, decode_rounds = [dict(batch_size=2, src_len=12, new_tokens=16)], 1
    else:
        train_config = TransformerConfig.from_preset(args.train_preset, vocab_size=args.vocab_size)
        decode_config = TransformerConfig.from_preset(args.decode_preset, vocab_size=args.vocab_size)
        train_shape, train_rounds = dict(batch_size=16, src_len=32, tgt_len=32), 5
        # a batch of sentences (the headline), and a single one (memory-bound on a CPU)
        decode_shapes = [dict(batch_size=8, src_len=32, new_tokens=64), dict(batch_size=1, src_len=32, new_tokens=64)]
        decode_rounds = 3

    results = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "quick": args.quick,
        # 1-minute load average: above ~0.5 another process competed for the 2 cores and the
        # numbers (with their spin-waiting OpenMP threads) are not to be trusted
        "load_average_before": os.getloadavg()[0],
    }
    # With the config's dropout (as trained), and without: PyTorch also drops attention weights
    # and FFN activations, which the paper (and ours) does not, so the second is compute alone.
    for key, config in [("training", train_config), ("training_without_dropout", replace(train_config, dropout=0.0))]:
        t = results[key] = bench_training(config, rounds=train_rounds, **train_shape)
        print(f"{key} (d_model {config.d_model}, dropout {config.dropout}): "
              f"ours {t['tokens_per_second']['ours']:.0f} tok/s, "
              f"nn.Transformer {t['tokens_per_second']['pytorch']:.0f} tok/s, "
              f"ratio {t['ratio_ours_over_pytorch']:.2f}x", flush=True)
    for key, shape in zip(["decoding", "decoding_batch_1"], decode_shapes):
        d = results[key] = bench_decoding(decode_config, rounds=decode_rounds, **shape)
        print(f"greedy decoding (d_model {decode_config.d_model}, batch {d['batch_size']}, {d['new_tokens']} tokens): "
              f"cached {d['seconds']['cached']:.2f} s, uncached {d['seconds']['uncached']:.2f} s, "
              f"speed-up {d['speedup_cached_over_uncached']:.1f}x", flush=True)

    results["load_average_after"] = os.getloadavg()[0]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
