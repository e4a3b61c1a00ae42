"""Does the training fast path change what a step learns? A controlled check, seeds × variants.

The Transformer's fast path draws dropout masks differently (`fromscratch.fast.dropout`: four
16-bit numbers per 64-bit random word) and runs training on the real positions only
(`transformer.fast.padding_free_loss`). Both should leave learning unchanged in distribution; this
trains the same small pre-norm model (d_model 128, 2 + 2 layers, dropout 0.3 to make any effect of
the masks larger) from the same initialisation on the same real batches (Tatoeba and two TED talk
sets, 1,000-token batches, AdamW 1e-3) in three variants, for several seeds:

    old_plain   nn.Dropout (PyTorch's masks), padded batches
    old         nn.Dropout, padding-free
    new         fast Dropout, padding-free (what `accelerate` does)

and prints, for each, the mean training loss over the last 200 steps and the validation loss per
target token on 400 held-out pairs. The differences between variants are to be read against the
spread between seeds. Run it alone or not: it measures learning, not time (~12 minutes here).

    python bench/translate_fast_path_check.py --steps 600 --seeds 3 | tee bench/results/translate_fast_path_check.log
"""

import argparse
import os
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from fromscratch.fast.dropout import Dropout
from fromscratch.transformer import Transformer, TransformerConfig
from fromscratch.transformer.data import TokenizedPairs, collate, load_corpora, token_batches
from fromscratch.transformer.fast import accelerate
from fromscratch.transformer.tokenizer import BPETokenizer

DATA = Path(os.environ.get("FROMSCRATCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "en-id"
FILES = ["tatoeba", "iwslt17-ted-tst2010", "iwslt17-ted-tst2011"]
VARIANTS = ("old_plain", "old", "new")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dropout", type=float, default=0.3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    corpus = load_corpora([str(DATA / name) for name in FILES], log=False)
    tokenizer = BPETokenizer.train(corpus.src + corpus.tgt, vocab_size=4000)
    pairs = TokenizedPairs.encode(corpus, tokenizer)
    src_len, tgt_len = pairs.src_lengths + 1, pairs.tgt_lengths + 1
    usable = np.nonzero((src_len <= 64) & (tgt_len <= 64))[0]
    valid_idx, train_idx = usable[:400], usable[400:]
    config = TransformerConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, norm_first=True,
                                           dropout=args.dropout, d_model=128, d_ff=512)

    def batches(idx, seed, epoch):
        plan = token_batches(src_len[idx], tgt_len[idx], 1000, seed, epoch)
        return [collate([pairs.source(idx[i]) for i in b], [pairs.target(idx[i]) for i in b], config.pad_id,
                        config.bos_id, config.eos_id) for b in plan]

    valid = batches(valid_idx, 0, 0)

    def run(variant, seed):
        torch.manual_seed(seed)
        model = accelerate(Transformer(config)).train()
        if variant.startswith("old"):
            for module in model.modules():
                if type(module) is Dropout:
                    module.__class__ = nn.Dropout
        if variant == "old_plain":
            model.teacher_forced_loss = None
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
        losses, epoch = [], 0
        while len(losses) < args.steps:
            for batch in batches(train_idx, seed, epoch)[:args.steps - len(losses)]:
                n_targets = int((batch["tgt_out"] != config.pad_id).sum())
                loss = model(batch["src"], batch["tgt_in"], targets=batch["tgt_out"], label_smoothing=0.1) / n_targets
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            epoch += 1
        model.eval()
        with torch.no_grad():
            total = sum(model(b["src"], b["tgt_in"], targets=b["tgt_out"]).item() for b in valid)
        return statistics.mean(losses[-200:]), total / sum(int((b["tgt_out"] != config.pad_id).sum()) for b in valid)

    results = {variant: [] for variant in VARIANTS}
    for seed in range(args.seeds):
        for variant in VARIANTS:
            results[variant].append(run(variant, seed))
            print(f"{variant} seed {seed}: train {results[variant][-1][0]:.4f} valid {results[variant][-1][1]:.4f}",
                  flush=True)
    for variant, runs in results.items():
        train_losses, valid_losses = [r[0] for r in runs], [r[1] for r in runs]
        spread = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
        print(f"{variant}: train {statistics.mean(train_losses):.4f} (sd {spread(train_losses):.4f}), "
              f"valid {statistics.mean(valid_losses):.4f} (sd {spread(valid_losses):.4f})")


if __name__ == "__main__":
    main()
