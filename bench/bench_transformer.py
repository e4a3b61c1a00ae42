"""The Transformer's speed on this machine's CPU, against the references users would otherwise run.

1. Training throughput: forward + backward + AdamW step of our model (with its opt-in fast paths,
   as `translate train` runs it: the label-smoothed loss without full logits) and of
   torch.nn.Transformer of the same size between the same embeddings and tied output head (its
   loss from the full logits, F.cross_entropy with label smoothing 0.1). Both with the config's
   dropout, padded sources, a causal target mask, fused AdamW. Ratio = ours / PyTorch; target ≥ 1.3×.
2. Cached greedy decoding, `base`, batch 1, 64 new tokens (EOS ignored): ours with the KV cache
   (and the packed one-token step) against re-running the whole prefix at every step (target ≥ 5×)
   and against `transformers.MarianMTModel.generate` holding the same weights (target ≥ 3×).
3. `translate eval` with beam 4 on the 2,000 opus100-dev sentences (when `--checkpoint RUN` names
   a `translate train` run): sentences per second of ours (`translate`, batches of 64 sorted by
   length) against `MarianMTModel.generate(num_beams=4)` on the same batches with the same
   weights; and whether both give the same translations (ours with the Hugging Face beam rule).
   Target ≥ 3×.

Each pair of contenders alternates round after round; the median round is reported (and the
best), with the load average at the start and end: run it alone on the machine.

    python bench/bench_transformer.py --checkpoint runs/enid-60min   # the real run, several minutes
    python bench/bench_transformer.py --quick                        # a smoke run, seconds
    python bench/bench_transformer.py --parts beam --checkpoint RUN --output OUT.json   # one part

Writes bench/results/transformer.json.
"""

import argparse
import os
import platform
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import alternate, write_results

from fromscratch.devices import describe_device
from fromscratch.transformer import Transformer, TransformerConfig, load_translator, translate
from fromscratch.transformer.data import collate_source, load_corpora
from fromscratch.transformer.decoding import greedy_decode
from fromscratch.transformer.fast import accelerate
from fromscratch.transformer.marian import write_marian

RESULTS = Path(__file__).resolve().parent / "results" / "transformer.json"
DATA = Path(os.environ.get("FROMSCRATCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "en-id"


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


def bench_training(config, batch_size, src_len, tgt_len, rounds, dtype=torch.float32):
    """Both models trained the same way; in bfloat16 both under the same CPU autocast."""
    torch.manual_seed(0)
    ours, theirs = accelerate(Transformer(config)).train(), PyTorchTransformer(config).train()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    src, tgt_in, target = batch(config, batch_size, src_len, tgt_len, torch.Generator().manual_seed(0))
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, fused=True)

    def autocast():
        return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    def ours_step():  # our training API: the loss through forward, as translate train computes it
        with autocast():
            loss = ours(src, tgt_in, targets=target, label_smoothing=0.1)
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def theirs_step():
        with autocast():
            logits = theirs(src, tgt_in)
            loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=config.pad_id,
                                   reduction="sum", label_smoothing=0.1)
        opt_theirs.zero_grad(set_to_none=True)
        loss.backward()
        opt_theirs.step()

    seconds = alternate({"ours": ours_step, "pytorch": theirs_step}, rounds)
    tokens = batch_size * (src_len + tgt_len)  # source + target positions per step
    return {
        "config": config.to_dict(), "dtype": str(dtype).removeprefix("torch."), "batch_size": batch_size,
        "src_len": src_len, "tgt_len": tgt_len, "seconds_per_step": seconds,
        "tokens_per_second": {name: tokens / s["median"] for name, s in seconds.items()},
        "ratio_ours_over_pytorch": seconds["pytorch"]["median"] / seconds["ours"]["median"],
        "ratio_best": seconds["pytorch"]["best"] / seconds["ours"]["best"],
    }


def marian_copy(model: Transformer):
    """transformers' MarianMTModel holding `model`'s weights (written by write_marian, read by HF)."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        write_marian(model, tmp)
        return transformers.MarianMTModel.from_pretrained(tmp).eval()


def bench_greedy(config, src_len, new_tokens, rounds):
    torch.manual_seed(0)
    plain = Transformer(config).eval()
    hf = marian_copy(plain)
    ours = accelerate(Transformer(config).eval())
    ours.load_state_dict(plain.state_dict())
    src, _, _ = batch(config, 1, src_len, 1, torch.Generator().manual_seed(1))
    src[:, -1] = config.eos_id
    never = [[config.pad_id], [config.start_id]]

    def cached():
        return greedy_decode(ours, src, new_tokens, stop_at_eos=False)

    def uncached():
        return greedy_decode(plain, src, new_tokens, use_cache=False, stop_at_eos=False)

    def huggingface():
        return hf.generate(src, attention_mask=src != config.pad_id, num_beams=1, do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, bad_words_ids=never,
                           decoder_start_token_id=config.start_id, eos_token_id=None, forced_eos_token_id=None)

    with torch.no_grad():
        assert torch.equal(cached(), uncached())
        same_as_hf = torch.equal(huggingface()[:, 1:], cached())
        seconds = alternate({"cached": cached, "uncached": uncached, "huggingface": lambda: huggingface()},
                            rounds)
    return {
        "config": config.to_dict(), "batch_size": 1, "src_len": src_len, "new_tokens": new_tokens,
        "seconds": seconds, "same_tokens_as_huggingface": same_as_hf,
        "tokens_per_second": {name: new_tokens / s["median"] for name, s in seconds.items()},
        "speedup_cached_over_uncached": seconds["uncached"]["median"] / seconds["cached"]["median"],
        "speedup_over_huggingface": seconds["huggingface"]["median"] / seconds["cached"]["median"],
    }


def bench_beam_eval(checkpoint: str, n_sentences: int, rounds: int) -> dict:
    model, tokenizer = load_translator(checkpoint)
    accelerate(model)
    hf = marian_copy(model)
    config = model.config
    dev = load_corpora([str(DATA / "opus100-dev")], max_chars=None)
    lines = dev.src[:n_sentences]
    ids = [tokenizer.encode(line)[: config.max_seq_len - 1] for line in lines]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = [collate_source([ids[i] for i in order[s:s + 64]], config.pad_id, config.eos_id)
               for s in range(0, len(order), 64)]

    def ours():
        return translate(model, tokenizer, lines, beam_size=4, batch_size=64, length_penalty=1.0,
                         length_penalty_style="hf")

    def huggingface():
        out = []
        for src in batches:
            max_new = int((src != config.pad_id).sum(1).max()) + 50
            generated = hf.generate(src, attention_mask=src != config.pad_id, num_beams=4, length_penalty=1.0,
                                    max_new_tokens=min(max_new, config.max_seq_len), do_sample=False,
                                    bad_words_ids=[[config.pad_id], [config.start_id]], forced_eos_token_id=None,
                                    decoder_start_token_id=config.start_id, eos_token_id=config.eos_id)
            out += [tokenizer.decode(row[1:]) for row in generated.tolist()]
        return out

    with torch.no_grad():
        ours_text = ours()
        theirs_by_order = huggingface()
        theirs_text = [""] * len(lines)
        for position, i in enumerate(order):
            theirs_text[i] = theirs_by_order[position]
        seconds = alternate({"ours": ours, "huggingface": huggingface}, rounds, warmup=0)
    return {
        "checkpoint": str(checkpoint), "sentences": len(lines), "beam": 4, "batch_size": 64,
        "seconds": seconds, "sentences_per_second": {n: len(lines) / s["median"] for n, s in seconds.items()},
        "speedup_over_huggingface": seconds["huggingface"]["median"] / seconds["ours"]["median"],
        "identical_translations": sum(a == b for a, b in zip(ours_text, theirs_text)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--checkpoint", help="a translate train run for the beam-4 eval benchmark")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--parts", default="training,greedy,beam",
                        help="which measurements, comma-separated (beam needs --checkpoint)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"training", "greedy", "beam"} or ("beam" in parts and not args.checkpoint):
        sys.exit(f"--parts {args.parts}: choose from training, greedy, beam (beam with --checkpoint)")
    torch.set_num_threads(args.threads)
    if args.checkpoint and load_translator(args.checkpoint)[0].config.norm_first:  # fail before an hour of work
        sys.exit(f"--checkpoint {args.checkpoint}: a pre-norm run has no MarianMTModel equivalent to time against; "
                 "give a post-norm one (translate train --no-norm-first)")

    if args.quick:
        train_config = decode_config = TransformerConfig.from_preset("tiny", vocab_size=1000)
        train_shape, rounds, new_tokens, n_sentences = dict(batch_size=8, src_len=16, tgt_len=16), 1, 8, 64
    else:
        train_config = TransformerConfig.from_preset("base", vocab_size=args.vocab_size)
        decode_config = TransformerConfig.from_preset("base", vocab_size=args.vocab_size, dropout=0.0)
        train_shape, rounds, new_tokens, n_sentences = dict(batch_size=16, src_len=32, tgt_len=32), 5, 64, 2000

    results = {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "hardware": describe_device("cpu"), "quick": args.quick,
        "parts": sorted(parts), "load_average_at_start": list(os.getloadavg()),
    }
    # With the config's dropout (as trained), and without: PyTorch also drops attention weights
    # and FFN activations, which the paper (and ours) does not, so the second is compute alone.
    # And both in bfloat16 under CPU autocast (`--dtype bfloat16`), where the CPU has bf16 products.
    runs = [("training", train_config, torch.float32),
            ("training_without_dropout", replace(train_config, dropout=0.0), torch.float32),
            ("training_bfloat16", train_config, torch.bfloat16)]
    for key, config, dtype in runs if "training" in parts else []:
        t = results[key] = bench_training(config, rounds=rounds, dtype=dtype, **train_shape)
        print(f"{key}: ours {t['tokens_per_second']['ours']:.0f} tok/s, nn.Transformer "
              f"{t['tokens_per_second']['pytorch']:.0f} tok/s, ratio {t['ratio_ours_over_pytorch']:.2f}x", flush=True)
    if "greedy" in parts:
        g = results["greedy_batch_1"] = bench_greedy(decode_config, 32, new_tokens, rounds)
        print(f"greedy, batch 1, {new_tokens} tokens: cached {g['tokens_per_second']['cached']:.0f} tok/s, uncached "
              f"{g['tokens_per_second']['uncached']:.0f}, MarianMTModel {g['tokens_per_second']['huggingface']:.0f}; "
              f"{g['speedup_cached_over_uncached']:.1f}x, {g['speedup_over_huggingface']:.1f}x", flush=True)
    if args.checkpoint and "beam" in parts:
        b = results["beam4_eval"] = bench_beam_eval(args.checkpoint, n_sentences, max(1, rounds // 2))
        print(f"beam-4 eval of {b['sentences']} sentences: ours {b['sentences_per_second']['ours']:.1f}/s, "
              f"MarianMTModel {b['sentences_per_second']['huggingface']:.1f}/s, {b['speedup_over_huggingface']:.1f}x; "
              f"{b['identical_translations']} identical", flush=True)
    results["load_average_at_end"] = list(os.getloadavg())
    write_results(results, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
