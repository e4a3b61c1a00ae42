"""Training the English→Indonesian Transformer.

The training loop itself is the shared engine's (`fromscratch.engine.Trainer`); this module holds
what is specific to translation:

- `TranslationTask`: the model, token-bucket batches (§5.1), the label-smoothed loss (§5.4) and
  validation (loss and greedy BLEU on a fixed slice of the validation set);
- `train`: corpora in, a run directory out (what `fromscratch translate train` calls);
- `train_demo`: the tiny model on the shipped everyday-sentences corpus (`fromscratch demo`).

Translating and scoring are in translate.py, the command line in cli.py.

The optimiser settings are the paper's (§5.3): Adam with β₁ = 0.9, β₂ = 0.98, ε = 10⁻⁹ and the
"noam" schedule lrate = d_model^-0.5 · min(step^-0.5, step · warmup^-1.5), here multiplied by
--lr (1.0 = the paper). One addition: gradients are clipped to norm 1.0, which the paper does not
mention; it caps the occasional large gradient (in the 60-minute OPUS run the norm exceeded
1.0 on 206 of 1181 steps, most often early on).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import sys
import time
from itertools import chain
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fromscratch.engine import TrainConfig, Trainer, check_run_state, make_train_config
from fromscratch.engine.checkpoint import write_json
from fromscratch.errors import UserError
from fromscratch.transformer.config import TransformerConfig
from fromscratch.transformer.data import (
    ParallelCorpus,
    TokenBatchSchedule,
    TokenizedPairs,
    closest_corpus,
    collate,
    filter_long_pairs,
    load_corpora,
    repeat_counts,
    tagged_pairs,
    token_batches,
)
from fromscratch.transformer.fast import accelerate
from fromscratch.transformer.model import Transformer
from fromscratch.transformer.tokenizer import TOKENIZER_FILE, BPEDropout, BPETokenizer, check_bpe_dropout, tag_token
from fromscratch.transformer.translation import DECODING_RECORD, evaluate_bleu

LABEL_SMOOTHING = 0.1  # ε_ls, §5.4 (`translate train --label-smoothing`)
BPE_DROPOUT_STREAM = 0xB9E  # the third key of a step's BPE-dropout generator: [seed, step, this]
DATA_RECORD = "translate_data.json"  # what the run was trained on; checked on --resume
RECORDED_LATER = ("label_smoothing", "vocab_size")  # compared on --resume only when the run recorded them


def paper_train_config(**overrides) -> TrainConfig:
    """The engine settings of §5.3 (base model: 100k steps, 4000 warm-up steps)."""
    settings = dict(
        max_steps=100_000, lr=1.0, warmup_steps=4000, schedule="noam", betas=(0.9, 0.98), eps=1e-9,
        weight_decay=0.0, clip_grad=1.0, eval_every=1000, save_every=1000,
    )
    return TrainConfig(**{**settings, **overrides})


def check_label_smoothing(epsilon: float) -> None:
    if not (math.isfinite(epsilon) and 0 <= epsilon < 1):
        raise UserError(f"--label-smoothing must be in [0, 1), got {epsilon}")


# ---------------------------------------------------------------------------------------------
# The task the engine drives


class TranslationTask:
    """Everything model-specific the engine needs to train a Transformer on parallel text.

    Batches: `global_batch(step)` returns the token-bucket batch of that step — pairs of similar
    length holding at most `batch_tokens` (padded) tokens per side, a pure function of (seed, step).
    The `--batch-size` of the engine is not used: a batch is a number of tokens, not sentences.
    """

    best_metric, best_mode = "val_loss", "min"
    model_name = "transformer"

    def __init__(
        self,
        train: ParallelCorpus,
        valid: ParallelCorpus,
        tokenizer: BPETokenizer,
        model_config: TransformerConfig,
        batch_tokens: int = 25_000,
        seed: int = 0,
        max_tokens: int | None = None,
        bleu_samples: int = 200,
        eval_batch_tokens: int | None = None,
        repeats: dict[str, int] | None = None,
        length_penalty: float | None = None,
        bpe_dropout: float = 0.0,
        label_smoothing: float = LABEL_SMOOTHING,
        vocab_size: int | None = None,
    ):
        check_label_smoothing(label_smoothing)
        if model_config.vocab_size != tokenizer.vocab_size:
            raise UserError(f"model vocab_size {model_config.vocab_size} ≠ tokenizer's {tokenizer.vocab_size}")
        self.tokenizer, self.model_config = tokenizer, model_config
        self.batch_tokens, self.seed = batch_tokens, seed
        self.length_penalty = length_penalty  # the beam search α the run records for `translate eval|run`
        self.label_smoothing = label_smoothing  # ε_ls of the training loss and of val_loss (§5.4)
        # +1 for </s> (source) or <s> (target input) must still fit the positional table.
        self.max_tokens = min(max_tokens or model_config.max_seq_len, model_config.max_seq_len) - 1
        if batch_tokens < self.max_tokens + 1:
            self.max_tokens = batch_tokens - 1  # every pair must fit a batch of its own
        with torch.random.fork_rng(devices=[]):  # the same initial weights for a given seed
            torch.manual_seed(seed)
            self.model = accelerate(Transformer(model_config))  # the opt-in fast paths: fast.py

        # With a source tag (`--tag NAME`, held by the tokenizer) the sources of NAME's files start
        # with it, and so does every validation source: the model is scored in the style it is steered to.
        tag = tokenizer.source_tag
        tagged = tagged_pairs(train.origins, tag) if tag else np.zeros(len(train), dtype=bool)
        self.train_pairs, keep = self._encode(train, "training", self.max_tokens, tagged)
        # --bpe-dropout P: each batch's pairs segmented anew (tokenizer.BPEDropout); the batches are
        # planned on the plain segmentation's lengths, and validation keeps the plain segmentation.
        self.bpe_dropout = None
        if bpe_dropout:
            self.bpe_dropout = [BPEDropout(tokenizer, [texts[i] for i in keep], bpe_dropout, seed=seed)
                                for texts in (train.src, train.tgt)]
            self.train_tagged = tagged[keep]
        # An epoch's pairs: each kept pair once, or as many times as --repeat asks for its corpus.
        self.epoch_pairs = np.repeat(np.arange(len(keep)), repeat_counts(train.origins, repeats)[keep]) \
            if repeats else np.arange(len(keep))
        # Validation skips only what the model cannot read: --max-tokens shapes the training data,
        # and the dev split is scored whole.
        self.valid_pairs, keep = self._encode(valid, "validation", model_config.max_seq_len - 1, tagged=True)
        self.valid_src_text = [valid.src[i] for i in keep]
        self.valid_ref_text = [valid.tgt[i] for i in keep]
        self.schedule = TokenBatchSchedule(self.train_pairs.src_lengths[self.epoch_pairs] + 1,
                                           self.train_pairs.tgt_lengths[self.epoch_pairs] + 1, batch_tokens, seed)
        self.valid_batches = sorted(
            token_batches(self.valid_pairs.src_lengths + 1, self.valid_pairs.tgt_lengths + 1,
                          eval_batch_tokens or batch_tokens, seed=0, epoch=0),
            key=lambda b: int(b[0]),
        )
        self.bleu_samples = min(bleu_samples, len(self.valid_pairs))
        self.fingerprint = {
            "train_pairs": len(self.train_pairs),
            "train_sha256": _sha256(train.src, train.tgt),
            "valid_pairs": len(self.valid_pairs),
            "valid_sha256": _sha256(valid.src, valid.tgt),
            "batch_tokens": batch_tokens,
            "max_tokens": self.max_tokens,
            "bleu_samples": self.bleu_samples,
        }
        if repeats:  # only then, so that runs made before --repeat existed still resume
            self.fingerprint["repeats"] = dict(sorted(repeats.items()))
        if tag:
            self.fingerprint["tag"] = tag
        if bpe_dropout:
            self.fingerprint["bpe_dropout"] = bpe_dropout
        # Recorded since they were found unchecked on --resume (the run's own tokenizer was kept
        # whatever --vocab-size asked; another ε silently changed the loss); older runs lack them.
        self.fingerprint["label_smoothing"] = label_smoothing
        if vocab_size is not None:  # what --vocab-size asked (the tokenizer may hold fewer)
            self.fingerprint["vocab_size"] = vocab_size

    def _encode(self, corpus: ParallelCorpus, what: str, max_tokens: int,
                tagged: np.ndarray | bool = False) -> tuple[TokenizedPairs, list[int]]:
        """Token ids of the pairs with both sides at most `max_tokens` long, and their indices in
        `corpus`; the `tagged` pairs' sources start with the source tag."""
        pairs = TokenizedPairs.encode(corpus, self.tokenizer, tagged=tagged)
        keep, _ = filter_long_pairs(pairs.src_lengths, pairs.tgt_lengths, corpus.origins, max_tokens)
        if not keep:
            raise UserError(f"no {what} pair is at most {max_tokens} tokens long")
        return (pairs if len(keep) == len(pairs) else pairs.select(keep)), keep

    # --- what the engine calls -------------------------------------------------------------

    def global_batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of (1-based) optimizer step `step`: src, tgt_in, tgt_out, each (B, ·)."""
        rows = self.epoch_pairs[self.schedule(step - 1)]
        if self.bpe_dropout is None:
            return self._collate(self.train_pairs, rows)
        return self._collate_dropped(rows, np.random.default_rng([self.seed, step, BPE_DROPOUT_STREAM]))

    def _collate_dropped(self, rows, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The pairs `rows` segmented with BPE-dropout: a side that comes out longer than
        `max_tokens` keeps its plain segmentation, so every batch still fits the model."""
        prefix = np.asarray(self.tokenizer.source_prefix, dtype=self.train_pairs.src.dtype)
        src, tgt = (dropout.sample(rows, rng) for dropout in self.bpe_dropout)
        src = [np.concatenate([prefix, ids]) if tagged else ids for ids, tagged in zip(src, self.train_tagged[rows])]
        src = [ids if len(ids) <= self.max_tokens else self.train_pairs.source(i) for ids, i in zip(src, rows)]
        tgt = [ids if len(ids) <= self.max_tokens else self.train_pairs.target(i) for ids, i in zip(tgt, rows)]
        t = self.tokenizer
        return collate(src, tgt, t.pad_id, self.model_config.start_id, t.eos_id)

    def _collate(self, pairs: TokenizedPairs, rows) -> dict[str, torch.Tensor]:
        t = self.tokenizer
        return collate([pairs.source(i) for i in rows], [pairs.target(i) for i in rows], t.pad_id,
                       self.model_config.start_id, t.eos_id)

    def loss(self, model, batch, label_smoothing: float | None = None) -> tuple[torch.Tensor, int]:
        """Sum over the non-pad target tokens of the label-smoothed cross-entropy (§5.4; ε_ls the
        task's unless given), and their number. Smoothing spreads ε_ls over the whole vocabulary
        (as PyTorch does)."""
        target = batch["tgt_out"]
        smoothing = self.label_smoothing if label_smoothing is None else label_smoothing
        loss = model(batch["src"], batch["tgt_in"], targets=target, label_smoothing=smoothing)
        return loss, int((target != self.model_config.pad_id).sum())

    @torch.no_grad()
    def evaluate(self, model, step: int) -> dict[str, float]:
        """val_loss (label-smoothed, comparable to the training loss), val_nll and val_ppl (plain
        cross-entropy per token) on the whole validation set; val_bleu and val_chrf of greedy
        translations of its first `bleu_samples` pairs. Uses no random numbers."""
        device = next(model.parameters()).device
        totals = torch.zeros(3, dtype=torch.float64)
        for rows in self.valid_batches:
            batch = self._collate(self.valid_pairs, rows)
            batch = {k: v.to(device) for k, v in batch.items()}
            smoothed, n = self.loss(model, batch)
            plain = smoothed if self.label_smoothing == 0 else self.loss(model, batch, label_smoothing=0.0)[0]
            totals += torch.tensor([smoothed.item(), plain.item(), n], dtype=torch.float64)
        metrics = {"val_loss": totals[0].item() / totals[2].item(), "val_nll": totals[1].item() / totals[2].item()}
        metrics["val_ppl"] = float(torch.tensor(metrics["val_nll"]).exp())
        if self.bleu_samples:
            scores = evaluate_bleu(model, self.tokenizer, self.valid_src_text[: self.bleu_samples],
                                   self.valid_ref_text[: self.bleu_samples], beam_size=1)
            metrics["val_bleu"], metrics["val_chrf"] = scores["bleu"], scores["chrf"]
        return metrics

    def save_artifacts(self, run_dir: Path) -> None:
        """tokenizer.json beside the checkpoints, the decoding settings of the recipe
        (`translation.run_length_penalty` reads them) and a record of the data `check_resume` reads."""
        run_dir = Path(run_dir)
        self.tokenizer.save(run_dir / TOKENIZER_FILE)
        if self.length_penalty is not None:
            write_json(run_dir / DECODING_RECORD, {"length_penalty": self.length_penalty})
        if not (run_dir / DATA_RECORD).exists():
            write_json(run_dir / DATA_RECORD, self.fingerprint)

    def check_resume(self, run_dir: Path) -> None:
        """Refuse to resume a run on other data or batches: the step → batch map would change."""
        record = Path(run_dir) / DATA_RECORD
        if not record.exists():
            return
        old = json.loads(record.read_text())
        keys = list(self.fingerprint) + [k for k in old if k not in self.fingerprint]  # one side's only, too
        keys = [k for k in keys if k in old or k not in RECORDED_LATER]
        changed = [f"{k} {old.get(k)} → {self.fingerprint.get(k)}" for k in keys if old.get(k) != self.fingerprint.get(k)]
        if changed:
            raise UserError(f"--resume: the data differ from those {run_dir} was trained on ({'; '.join(changed)}); "
                            "repeat the original --train/--valid/--batch-tokens/--max-tokens/--bpe-dropout/"
                            "--label-smoothing/--vocab-size or use a new --out")

    def flops_per_token(self) -> float:
        """Training FLOPs per target token, the usual 6·N + attention estimate (Kaplan et al. 2020):

            6 · (N_enc · r + N_dec + V·d)  +  12 · d · (L_enc · S̄ · r + L_dec · (T̄ + S̄))

        N_enc / N_dec: non-embedding parameters of each stack; V·d: the output projection (tied to
        the embedding, but a real matrix product per target token); r = source tokens per target
        token in the training data; S̄, T̄: mean source and target lengths (attention's QKᵀ and AV
        cost 2·2·d per query–key pair forward, ×3 with the backward pass)."""
        c = self.model_config
        n_enc = sum(p.numel() for p in self.model.encoder_layers.parameters())
        n_dec = sum(p.numel() for p in self.model.decoder_layers.parameters())
        n_pairs = len(self.epoch_pairs)
        src_tokens = int(self.train_pairs.src_lengths[self.epoch_pairs].sum()) + n_pairs  # + </s>
        tgt_tokens = int(self.train_pairs.tgt_lengths[self.epoch_pairs].sum()) + n_pairs
        r, s_mean, t_mean = src_tokens / tgt_tokens, src_tokens / n_pairs, tgt_tokens / n_pairs
        dense = 6 * (n_enc * r + n_dec + c.vocab_size * c.d_model)
        attention = 12 * c.d_model * (c.n_encoder_layers * s_mean * r + c.n_decoder_layers * (t_mean + s_mean))
        return float(dense + attention)


def _sha256(*columns: list[str]) -> str:
    h = hashlib.sha256()
    for column in columns:
        for line in column:
            h.update(line.encode("utf-8") + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Training from Python (what `fromscratch translate train` calls)


SHAPE_FIELDS = ("d_model", "n_heads", "n_encoder_layers", "n_decoder_layers", "d_ff")  # what `shape` may set

# The default recipes of `translate train`, chosen by the device. On a GPU, the paper's `base`
# (§5.3, Table 3) in bfloat16 with torch.compile. On a CPU, what trains best in an hour on two
# cores (bench/translate_ablations.py; the Transformer README's ablation table): the `slim`
# model (`small` at half its width; `narrow`, at three quarters, took 1.45x small's steps in the
# hour and +2.1 to +2.8 BLEU, and `slim` 1.6-1.8x narrow's steps and +1.3 to +1.5 BLEU, two seeds
# each: the hour is short of steps more than of capacity), pre-norm layers with a
# higher learning rate, smaller batches, more frequent checkpoints (averaged at evaluation, §6.1),
# training pairs of at most 48 tokens a side (short sentences like the dev split's film dialogue:
# 64 beat 256, and 48 beat 64, each in two hours of two seeds; 32 kept half the pairs and scored
# no better), a 4,000-token vocabulary (two seeds; Sennrich & Zhang 2019 found fewer merges
# better for little data), in float32: bfloat16 autocast raised chrF but not BLEU over two seeds
# of an hour. The rate falls to ~0 over the last fifth of the run (`cooldown`: on `slim`, a lower
# validation loss at equal steps on two seeds; the annealed last checkpoint scores as the average
# of five did), and beam search takes α = 1.2 (`decoding`, recorded in each run: outputs a tenth
# shorter than the references at §6.1's 0.6; +0.2 BLEU and +0.7 chrF on two seeds). Dropout 0 and
# over-sampled conversational corpora won at ten minutes but lost over the hour (with a cooldown,
# on `small`); dropout 0.2 and 5 encoder + 2 decoder layers each lost over an hour; on `slim`,
# 4 + 4 layers, dropout 0 (it overfits after ~5,000 steps), dropout 0.2, --lr 2 and BPE-dropout 0.1
# trailed in screens, pairs of up to 64 tokens (an hour) and --lr 0.5 (the hour's steps) lost,
# and dropout off for the first 2,000 steps (--dropout-from 2000, two hours) led early and then
# not on the second seed (README), so they stay flags (--dropout, --repeat, --n-encoder-layers,
# --max-tokens, --lr, --bpe-dropout, --dropout-from, ...), not the recipe. AdamW's decoupled
# weight decay on the matrices (`weight_decay`; Loshchilov & Hutter 2019): 0.1 lowered the
# validation loss by ~0.12 at equal steps from step 3,000 on and raised every score by ~3 BLEU;
# 0.2 lowered it by another ~0.07 at the end and raised the mean of two seeds on every line
# (BLEU +0.07 to +0.39, chrF +0.57 to +0.67); 0.3 trailed 0.2 in a screen (README, "Weight decay").
RECIPES = {
    "gpu": dict(model=dict(preset="base", vocab_size=8000, batch_tokens=25_000, max_tokens=256, norm_first=False,
                           dropout=None),
                engine=dict(dtype="bfloat16", compile=True), decoding=dict(length_penalty=0.6)),
    "cpu": dict(model=dict(preset="slim", vocab_size=4000, batch_tokens=1500, max_tokens=48, norm_first=True,
                           dropout=None),
                engine=dict(lr=1.0, warmup_steps=400, eval_every=500, save_every=250, keep_last=5, cooldown=0.2,
                            weight_decay=0.2),
                decoding=dict(length_penalty=1.2)),
}


def recipe(device: str = "auto") -> dict:
    """The default settings of `train` for `device`: {"model": ..., "engine": ..., "decoding": ...} (RECIPES)."""
    from fromscratch.devices import resolve_device

    return RECIPES["gpu" if resolve_device(device).type == "cuda" else "cpu"]


def train(train: str | list[str], valid: str, out: str | Path, *, preset: str | None = None,
          vocab_size: int | None = None, batch_tokens: int | None = None, max_tokens: int | None = None,
          dropout: float | None = None, norm_first: bool | None = None, shape: dict[str, int] | None = None,
          activation: str | None = None, bleu_samples: int = 200, repeats: dict[str, int] | None = None, tag: str | None = None,
          bpe_dropout: float = 0.0, label_smoothing: float = LABEL_SMOOTHING, command: list[str] | None = None,
          **engine) -> dict:
    """Train a Transformer on parallel corpora (PREFIX.en / PREFIX.id files, `demo:train`,
    `opus100:train`, ...; see `data.load_corpora`), validating on `valid`, into the run directory
    `out`. A setting left None takes the device's recipe (`RECIPES`: on a CPU the one-hour recipe,
    on a GPU the paper's `base`). `engine`: the shared engine's options (`max_steps`, `lr` — a
    multiplier on the noam schedule —, `warmup_steps`, `max_minutes`, `resume`, ...;
    `fromscratch.engine.TrainConfig`). `repeats`: {NAME: N} puts the pairs of each training file
    whose name starts with NAME N times into every epoch (`--repeat tatoeba=4`; `data.repeat_counts`).
    `shape`: the preset's sizes replaced, any of {"d_model", "n_heads", "n_encoder_layers",
    "n_decoder_layers", "d_ff"} (`--d-model 192 --n-decoder-layers 2`; SHAPE_FIELDS).
    `activation`: the FFN's non-linearity in place of the paper's relu (`--activation gelu`; config.ACTIVATIONS).
    `tag`: NAME puts the token <NAME> before the sources of the files whose name starts with NAME
    and before every source the run validates and translates (`--tag tatoeba`; tokenizer.py);
    "auto" takes the training file whose words are most like the validation targets'
    (`data.closest_corpus`).
    `bpe_dropout`: P > 0 segments each training batch anew with BPE-dropout at rate P
    (Provilkov et al. 2020; `tokenizer.BPEDropout`); validation and translation keep the plain BPE.
    `label_smoothing`: ε_ls of the training loss (§5.4; 0.1, the paper's, unless given); val_nll is
    unsmoothed whatever it is.
    Returns the engine's result: {"step", "train", "eval", "best", "run_dir"}.
    """
    defaults = recipe(engine.get("device") or "auto")
    given = dict(preset=preset, vocab_size=vocab_size, batch_tokens=batch_tokens, max_tokens=max_tokens,
                 norm_first=norm_first, dropout=dropout)
    settings = {name: value if value is not None else defaults["model"][name] for name, value in given.items()}
    preset, vocab_size, batch_tokens, max_tokens = (settings[name] for name in
                                                    ("preset", "vocab_size", "batch_tokens", "max_tokens"))
    engine = {**defaults["engine"], **{k: v for k, v in engine.items() if v is not None}}
    if vocab_size < 260:
        raise UserError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least 260")
    if batch_tokens < 8:
        raise UserError(f"--batch-tokens {batch_tokens} is too small")
    if max_tokens is not None and max_tokens < 2:
        raise UserError(f"--max-tokens must be at least 2 (a token and the end token), got {max_tokens}")
    check_bpe_dropout(bpe_dropout)  # before the corpora are read
    check_label_smoothing(label_smoothing)
    overrides = {name: settings[name] for name in ("dropout", "norm_first") if settings[name] is not None}
    if activation is not None:
        overrides["activation"] = activation
    for name, value in (shape or {}).items():
        if name not in SHAPE_FIELDS:
            raise UserError(f"shape {name!r}: choose among {', '.join(SHAPE_FIELDS)}")
        if value is not None:
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
            overrides[name] = value
    TransformerConfig.from_preset(preset, **overrides)  # an unknown preset, a bad shape or dropout fails now
    config = make_train_config(paper_train_config(), out, **engine)
    config.check_before_work()
    check_run_state(out, config.resume, TranslationTask.model_name)  # before the corpora are read
    train_corpus = load_corpora([train] if isinstance(train, str) else list(train))
    if repeats:
        repeat_counts(train_corpus.origins, repeats)  # a NAME that matches no file fails now
    valid_corpus = load_corpora([valid])
    if tag == "auto":  # the training file most like the validation data (data.closest_corpus)
        tag, entropy = closest_corpus(train_corpus, valid_corpus)
        others = ", ".join(f"{name} {value:.2f}" for name, value in sorted(entropy.items(), key=lambda kv: kv[1])[1:4])
        print(f"--tag auto: {tag}, whose words predict the validation targets best "
              f"({entropy[tag]:.2f} nats/word; then {others or 'no other file'})", file=sys.stderr)
    if tag:
        tagged_pairs(train_corpus.origins, tag)  # a NAME that matches no file fails now, and a malformed one
        tag_token(tag)
    out = Path(out)
    if config.resume and (out / TOKENIZER_FILE).exists():
        tokenizer = BPETokenizer.load(out / TOKENIZER_FILE)  # the run's own, not a retrained one
        if tokenizer.source_tag != tag:
            raise UserError(f"--resume: {out} was trained with {_tag_flag(tokenizer.source_tag)}, "
                            f"not {_tag_flag(tag)}; repeat the original flags or use a new --out")
    else:
        tokenizer = BPETokenizer.train(chain(train_corpus.src, train_corpus.tgt), vocab_size=vocab_size,
                                       source_tag=tag)
    model_config = TransformerConfig.from_preset(preset, vocab_size=tokenizer.vocab_size, **overrides)
    task = TranslationTask(train_corpus, valid_corpus, tokenizer, model_config, batch_tokens=batch_tokens,
                           seed=config.seed, max_tokens=max_tokens, bleu_samples=bleu_samples, repeats=repeats,
                           length_penalty=defaults["decoding"]["length_penalty"], bpe_dropout=bpe_dropout,
                           label_smoothing=label_smoothing, vocab_size=vocab_size)
    del train_corpus  # the task holds the token ids; the text need not stay in memory beside them
    config.noam_d_model = model_config.d_model
    # Unused by translate; set so the engine's check that it splits over processes × accumulation passes.
    config.batch_size = int(os.environ.get("WORLD_SIZE", 1)) * config.grad_accum
    if config.resume:
        task.check_resume(out)
    print(f"train: {len(task.train_pairs)} pairs; valid: {len(task.valid_pairs)} pairs; "
          f"vocab {tokenizer.vocab_size}; {sum(p.numel() for p in task.model.parameters()):,} parameters"
          + (f"; BPE-dropout {bpe_dropout}: {task.bpe_dropout[0].variants} splits of each of "
             f"{sum(d.n_types for d in task.bpe_dropout):,} word types" if task.bpe_dropout else ""),
          file=sys.stderr)
    return Trainer(task, config, command=command).fit()


def _tag_flag(tag: str | None) -> str:
    return f"--tag {tag}" if tag else "no --tag"


# ---------------------------------------------------------------------------------------------
# The demo


DEMO_SETTINGS = dict(vocab_size=1000, batch_tokens=1500, lr=0.5, warmup_steps=100, max_steps=500)


def train_demo(out_dir: str | Path, max_steps: int = DEMO_SETTINGS["max_steps"], seed: int = 0,
               beam_size: int = 1, n_examples: int = 5, device: str = "auto", quiet: bool = False) -> dict:
    """Train the `tiny` Transformer on the shipped everyday-sentences corpus and score it on the
    held-out pairs (`demo:test`, never seen in training).

    Returns {"bleu", "chrf", "examples": [{"source", "reference", "translation"}, ...],
    "seconds", "steps", "run_dir", "test_pairs"}. `out_dir` must not hold a run already.
    """
    started = time.perf_counter()
    train, test = load_corpora(["demo:train"]), load_corpora(["demo:test"])
    tokenizer = BPETokenizer.train(train.src + train.tgt, vocab_size=DEMO_SETTINGS["vocab_size"])
    model_config = TransformerConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=128)
    # The held-out pairs double as the validation set, but only for the val_loss logged after the
    # last step: with a single evaluation nothing is selected on them.
    task = TranslationTask(train, test, tokenizer, model_config, batch_tokens=DEMO_SETTINGS["batch_tokens"],
                           seed=seed, bleu_samples=0)
    config = paper_train_config(
        out_dir=str(out_dir), max_steps=max_steps, lr=DEMO_SETTINGS["lr"], warmup_steps=DEMO_SETTINGS["warmup_steps"],
        noam_d_model=model_config.d_model, eval_every=max_steps, save_every=max_steps, seed=seed, device=device,
    )
    trainer = Trainer(task, config, command=["fromscratch", "demo"])
    if quiet:  # no progress bar or evaluation lines
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            result = trainer.fit()
    else:
        result = trainer.fit()
    model = task.model.eval()
    scores = evaluate_bleu(model, tokenizer, test.src, test.tgt, beam_size=beam_size)
    examples = [{"source": s, "reference": r, "translation": h}
                for s, r, h in list(zip(test.src, test.tgt, scores["hypotheses"]))[:n_examples]]
    return {
        "bleu": scores["bleu"], "chrf": scores["chrf"], "examples": examples, "test_pairs": len(test),
        "steps": result["step"], "seconds": time.perf_counter() - started, "run_dir": str(out_dir),
    }


