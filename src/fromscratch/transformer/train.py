"""Training, evaluating and running the English→Indonesian Transformer.

The training loop itself is the shared engine's (`fromscratch.engine.Trainer`); this module holds
what is specific to translation:

- `TranslationTask`: the model, token-bucket batches (§5.1), the label-smoothed loss (§5.4) and
  validation (loss and greedy BLEU on a fixed slice of the validation set);
- `translate` and `evaluate_bleu`: beam-search decoding (§6.1) of many sentences and sacreBLEU
  BLEU / chrF on the detokenised output;
- `train_demo`: the tiny model on the shipped everyday-sentences corpus (`fromscratch demo`);
- the command line: `fromscratch translate train | eval | run` (`add_translate_commands`).

The optimiser settings are the paper's (§5.3): Adam with β₁ = 0.9, β₂ = 0.98, ε = 10⁻⁹ and the
"noam" schedule lrate = d_model^-0.5 · min(step^-0.5, step · warmup^-1.5), here multiplied by
--lr (1.0 = the paper). One addition: gradients are clipped to norm 1.0, which the paper does not
mention; it caps the occasional large gradient (in the 60-minute OPUS run the norm exceeded
1.0 on 206 of 1181 steps, most often early on).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fromscratch.engine import TrainConfig, Trainer, add_train_arguments, load_run, train_config_from_args
from fromscratch.errors import UserError
from fromscratch.transformer.data import (
    ParallelCorpus,
    TokenBatchSchedule,
    collate,
    collate_source,
    filter_long_pairs,
    load_corpora,
    token_batches,
)
from fromscratch.transformer.model import PRESETS, Transformer, TransformerConfig
from fromscratch.transformer.tokenizer import TOKENIZER_FILE, BPETokenizer

LABEL_SMOOTHING = 0.1  # ε_ls, §5.4
DATA_RECORD = "translate_data.json"  # what the run was trained on; checked on --resume


def paper_train_config(**overrides) -> TrainConfig:
    """The engine settings of §5.3 (base model: 100k steps, 4000 warm-up steps)."""
    settings = dict(
        max_steps=100_000, lr=1.0, warmup_steps=4000, schedule="noam", betas=(0.9, 0.98), eps=1e-9,
        weight_decay=0.0, clip_grad=1.0, eval_every=1000, save_every=1000,
    )
    return TrainConfig(**{**settings, **overrides})


# ---------------------------------------------------------------------------------------------
# The task the engine drives


class TranslationTask:
    """Everything model-specific the engine needs to train a Transformer on parallel text.

    Batches: `global_batch(step)` returns the token-bucket batch of that step — pairs of similar
    length holding at most `batch_tokens` (padded) tokens per side, a pure function of (seed, step).
    The `--batch-size` of the engine is not used: a batch is a number of tokens, not sentences.
    """

    best_metric, best_mode = "val_loss", "min"

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
    ):
        if model_config.vocab_size != tokenizer.vocab_size:
            raise UserError(f"model vocab_size {model_config.vocab_size} ≠ tokenizer's {tokenizer.vocab_size}")
        self.tokenizer, self.model_config = tokenizer, model_config
        self.batch_tokens, self.seed = batch_tokens, seed
        # +1 for </s> (source) or <s> (target input) must still fit the positional table.
        self.max_tokens = min(max_tokens or model_config.max_seq_len, model_config.max_seq_len) - 1
        if batch_tokens < self.max_tokens + 1:
            self.max_tokens = batch_tokens - 1  # every pair must fit a batch of its own
        with torch.random.fork_rng(devices=[]):  # the same initial weights for a given seed
            torch.manual_seed(seed)
            self.model = Transformer(model_config)

        self.train_src, self.train_tgt, _ = self._encode(train, "training")
        self.valid_src, self.valid_tgt, keep = self._encode(valid, "validation")
        self.valid_src_text = [valid.src[i] for i in keep]
        self.valid_ref_text = [valid.tgt[i] for i in keep]
        self.schedule = TokenBatchSchedule(
            [len(s) + 1 for s in self.train_src], [len(t) + 1 for t in self.train_tgt], batch_tokens, seed
        )
        self.valid_batches = sorted(
            token_batches([len(s) + 1 for s in self.valid_src], [len(t) + 1 for t in self.valid_tgt],
                          eval_batch_tokens or batch_tokens, seed=0, epoch=0),
            key=lambda b: int(b[0]),
        )
        self.bleu_samples = min(bleu_samples, len(self.valid_src))
        self.fingerprint = {
            "train_pairs": len(self.train_src),
            "train_sha256": _sha256(train.src, train.tgt),
            "valid_pairs": len(self.valid_src),
            "valid_sha256": _sha256(valid.src, valid.tgt),
            "batch_tokens": batch_tokens,
            "max_tokens": self.max_tokens,
            "bleu_samples": self.bleu_samples,
        }

    def _encode(self, corpus: ParallelCorpus, what: str) -> tuple[list[list[int]], list[list[int]], list[int]]:
        """Token ids of the pairs that fit max_tokens, and their indices in `corpus`."""
        src, tgt = self.tokenizer.encode_batch(corpus.src), self.tokenizer.encode_batch(corpus.tgt)
        keep, _ = filter_long_pairs(src, tgt, corpus.origins, self.max_tokens)
        if not keep:
            raise UserError(f"no {what} pair is at most {self.max_tokens} tokens long")
        return [src[i] for i in keep], [tgt[i] for i in keep], keep

    # --- what the engine calls -------------------------------------------------------------

    def global_batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of (1-based) optimizer step `step`: src, tgt_in, tgt_out, each (B, ·)."""
        rows = self.schedule(step - 1)
        return self._collate([self.train_src[i] for i in rows], [self.train_tgt[i] for i in rows])

    def _collate(self, src, tgt):
        t = self.tokenizer
        return collate(src, tgt, t.pad_id, t.bos_id, t.eos_id)

    def loss(self, model, batch, label_smoothing: float = LABEL_SMOOTHING) -> tuple[torch.Tensor, int]:
        """Sum over the non-pad target tokens of the label-smoothed cross-entropy (§5.4), and
        their number. Smoothing spreads ε_ls over the whole vocabulary (as PyTorch does)."""
        logits = model(batch["src"], batch["tgt_in"])  # (B, T, V)
        target = batch["tgt_out"]
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), target.flatten(), ignore_index=self.tokenizer.pad_id,
            reduction="sum", label_smoothing=label_smoothing,
        )
        return loss, int((target != self.tokenizer.pad_id).sum())

    @torch.no_grad()
    def evaluate(self, model, step: int) -> dict[str, float]:
        """val_loss (label-smoothed, comparable to the training loss), val_nll and val_ppl (plain
        cross-entropy per token) on the whole validation set; val_bleu and val_chrf of greedy
        translations of its first `bleu_samples` pairs. Uses no random numbers."""
        device = next(model.parameters()).device
        totals = torch.zeros(3, dtype=torch.float64)
        for rows in self.valid_batches:
            batch = self._collate([self.valid_src[i] for i in rows], [self.valid_tgt[i] for i in rows])
            batch = {k: v.to(device) for k, v in batch.items()}
            smoothed, n = self.loss(model, batch)
            plain, _ = self.loss(model, batch, label_smoothing=0.0)
            totals += torch.tensor([smoothed.item(), plain.item(), n], dtype=torch.float64)
        metrics = {"val_loss": totals[0].item() / totals[2].item(), "val_nll": totals[1].item() / totals[2].item()}
        metrics["val_ppl"] = float(torch.tensor(metrics["val_nll"]).exp())
        if self.bleu_samples:
            scores = evaluate_bleu(model, self.tokenizer, self.valid_src_text[: self.bleu_samples],
                                   self.valid_ref_text[: self.bleu_samples], beam_size=1)
            metrics["val_bleu"], metrics["val_chrf"] = scores["bleu"], scores["chrf"]
        return metrics

    def save_artifacts(self, run_dir: Path) -> None:
        """tokenizer.json beside the checkpoints, and a record of the data `check_resume` reads."""
        run_dir = Path(run_dir)
        self.tokenizer.save(run_dir / TOKENIZER_FILE)
        if not (run_dir / DATA_RECORD).exists():
            (run_dir / DATA_RECORD).write_text(json.dumps(self.fingerprint, indent=2) + "\n")

    def check_resume(self, run_dir: Path) -> None:
        """Refuse to resume a run on other data or batches: the step → batch map would change."""
        record = Path(run_dir) / DATA_RECORD
        if not record.exists():
            return
        old = json.loads(record.read_text())
        changed = [f"{k} {old.get(k)} → {v}" for k, v in self.fingerprint.items() if old.get(k) != v]
        if changed:
            raise UserError(f"--resume: the data differ from those {run_dir} was trained on ({'; '.join(changed)}); "
                            "repeat the original --train/--valid/--batch-tokens/--max-tokens or use a new --out")

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
        src_tokens = sum(len(s) + 1 for s in self.train_src)
        tgt_tokens = sum(len(t) + 1 for t in self.train_tgt)
        r, s_mean, t_mean = src_tokens / tgt_tokens, src_tokens / len(self.train_src), tgt_tokens / len(self.train_tgt)
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
# Translating and scoring


@torch.no_grad()
def translate(model: Transformer, tokenizer: BPETokenizer, lines: list[str], beam_size: int = 4,
              batch_size: int = 64, length_penalty: float = 0.6) -> list[str]:
    """Detokenised translations of `lines`, in order. Sentences are decoded in batches of
    similar length; a source longer than the model's max_seq_len is cut to fit."""
    if not lines:
        return []
    device = next(model.parameters()).device
    limit = model.config.max_seq_len - 1
    ids = [tokenizer.encode(line)[:limit] for line in lines]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(lines)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        src = collate_source([ids[i] for i in rows], tokenizer.pad_id, tokenizer.eos_id).to(device)
        generated = model.generate(src, beam_size=beam_size, length_penalty=length_penalty)
        for i, row in zip(rows, generated.tolist()):
            out[i] = tokenizer.decode(row)
    return out


def evaluate_bleu(model, tokenizer, src_lines: list[str], ref_lines: list[str], beam_size: int = 4,
                  batch_size: int = 64) -> dict:
    """Translate `src_lines` and score against `ref_lines` with sacreBLEU (default 13a
    tokenisation, on detokenised text): {"bleu", "chrf", "hypotheses"}."""
    import sacrebleu

    if len(src_lines) != len(ref_lines):
        raise UserError(f"{len(src_lines)} source lines but {len(ref_lines)} references")
    hypotheses = translate(model, tokenizer, list(src_lines), beam_size, batch_size)
    refs = [list(ref_lines)]
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, refs).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, refs).score,
        "hypotheses": hypotheses,
    }


def load_translator(path: str | Path, device: str = "cpu") -> tuple[Transformer, BPETokenizer, Path]:
    """The model and tokenizer of a run directory (its best checkpoint, else its latest) or of
    one checkpoint directory inside a run: (model in eval mode, tokenizer, checkpoint's run dir)."""
    state, config_dict, run_dir = load_run(path, which="best")
    tokenizer_path = next((p / TOKENIZER_FILE for p in (Path(path), run_dir) if (p / TOKENIZER_FILE).exists()), None)
    if tokenizer_path is None:
        raise UserError(f"no {TOKENIZER_FILE} in {path} or {run_dir}: is this a `fromscratch translate train` run?")
    tokenizer = BPETokenizer.load(tokenizer_path)
    config = TransformerConfig.from_dict(config_dict)
    model = Transformer(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: not a Transformer checkpoint (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(_device(device)).eval(), tokenizer, run_dir


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here")
    return torch.device(name)


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


# ---------------------------------------------------------------------------------------------
# The command line


def add_translate_commands(subparsers) -> None:
    """`fromscratch translate train | eval | run`."""
    translate_parser = subparsers.add_parser(
        "translate", help="the Transformer (Vaswani et al. 2017): English → Indonesian",
        description="Train, evaluate and run the English→Indonesian Transformer.",
    )
    verbs = translate_parser.add_subparsers(dest="translate_command", required=True, metavar="VERB")

    train_p = verbs.add_parser(
        "train", help="train on parallel text",
        description="Train a Transformer on line-aligned PREFIX.en / PREFIX.id files. A PREFIX may also be "
                    "demo:train / demo:test (the shipped everyday corpus) or opus100:SPLIT (the hub; needs "
                    "fromscratch[hub]); relative prefixes are also looked up under $FROMSCRATCH_DATA.",
    )
    train_p.add_argument("--train", nargs="+", required=True, metavar="PREFIX", help="training corpora")
    train_p.add_argument("--valid", required=True, metavar="PREFIX", help="validation corpus")
    train_p.add_argument("--preset", default="base", choices=list(PRESETS), help="model size (default: base, Table 3)")
    train_p.add_argument("--vocab-size", type=int, default=8000, help="joint BPE vocabulary size (default: 8000)")
    train_p.add_argument("--batch-tokens", type=int, default=25_000,
                         help="padded tokens per side in a batch (default: 25000, §5.1); replaces --batch-size")
    train_p.add_argument("--max-tokens", type=int, default=256,
                         help="skip training pairs with a side longer than this many tokens (default: 256)")
    train_p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    train_p.add_argument("--bleu-samples", type=int, default=200,
                         help="validation pairs translated (greedy) for val_bleu at each evaluation (default: 200)")
    add_train_arguments(train_p, paper_train_config())
    for action in train_p._actions:  # argparse has no public way to reword a shared flag's help
        if action.dest == "batch_size":
            action.help = "not used by translate: batches are sized by --batch-tokens"
        elif action.dest == "lr":
            action.help = "multiplier on the noam schedule of §5.3 (default: 1.0, the paper)"
        elif action.dest == "warmup_steps":
            action.help = "noam warm-up steps (default: 4000, §5.3)"
    train_p.set_defaults(func=cmd_train)

    eval_p = verbs.add_parser("eval", help="BLEU and chrF on a test corpus",
                              description="Translate PREFIX.en and score it against PREFIX.id with sacreBLEU. "
                                          "The last line printed is 'BLEU <score> chrF <score>'.")
    eval_p.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory or one checkpoint in it")
    eval_p.add_argument("--test", required=True, metavar="PREFIX", help="test corpus")
    eval_p.add_argument("--beam", type=int, default=4, help="beam size; 1 = greedy (default: 4, §6.1)")
    eval_p.add_argument("--batch-size", type=int, default=64, help="sentences per decoding batch")
    eval_p.add_argument("--output", metavar="FILE", help="also write the translations here, one per line")
    eval_p.add_argument("--device", default="auto")
    eval_p.set_defaults(func=cmd_eval)

    run_p = verbs.add_parser("run", help="translate sentences",
                             description="Translate the TEXT arguments, or standard input line by line.")
    run_p.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory or one checkpoint in it")
    run_p.add_argument("--beam", type=int, default=4, help="beam size; 1 = greedy (default: 4)")
    run_p.add_argument("--device", default="auto")
    run_p.add_argument("text", nargs="*", metavar="TEXT", help="English sentences (default: read standard input)")
    run_p.set_defaults(func=cmd_run)


def cmd_train(args: argparse.Namespace) -> None:
    if args.vocab_size < 260:
        raise UserError(f"--vocab-size {args.vocab_size} is too small: byte-level BPE needs at least 260")
    if args.batch_tokens < 8:
        raise UserError(f"--batch-tokens {args.batch_tokens} is too small")
    train = load_corpora(args.train)
    valid = load_corpora([args.valid])
    out = Path(args.out)
    if args.resume and (out / TOKENIZER_FILE).exists():
        tokenizer = BPETokenizer.load(out / TOKENIZER_FILE)  # the run's own, not a retrained one
    else:
        tokenizer = BPETokenizer.train(train.src + train.tgt, vocab_size=args.vocab_size)
    overrides = {"vocab_size": tokenizer.vocab_size}
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    model_config = TransformerConfig.from_preset(args.preset, **overrides)
    task = TranslationTask(train, valid, tokenizer, model_config, batch_tokens=args.batch_tokens, seed=args.seed,
                           max_tokens=args.max_tokens, bleu_samples=args.bleu_samples)
    defaults = paper_train_config(noam_d_model=model_config.d_model)
    config = train_config_from_args(args, defaults)
    # Unused by translate; set so the engine's check that it splits over processes × accumulation passes.
    config.batch_size = int(os.environ.get("WORLD_SIZE", 1)) * config.grad_accum
    if args.resume:
        task.check_resume(out)
    print(f"train: {len(task.train_src)} pairs from {', '.join(args.train)}; valid: {len(task.valid_src)} pairs; "
          f"vocab {tokenizer.vocab_size}; {sum(p.numel() for p in task.model.parameters()):,} parameters",
          file=sys.stderr)
    result = Trainer(task, config, command=["fromscratch", *sys.argv[1:]]).fit()
    print(json.dumps({"step": result["step"], **result["eval"], "best": result["best"], "run_dir": result["run_dir"]}))


def cmd_eval(args: argparse.Namespace) -> None:
    if args.beam < 1:
        raise UserError(f"--beam must be at least 1, got {args.beam}")
    model, tokenizer, _ = load_translator(args.checkpoint, args.device)
    test = load_corpora([args.test], max_chars=None)
    print(f"{len(test)} pairs from {args.test}, beam {args.beam}", file=sys.stderr)
    scores = evaluate_bleu(model, tokenizer, test.src, test.tgt, beam_size=args.beam, batch_size=args.batch_size)
    if args.output:
        Path(args.output).write_text("".join(h + "\n" for h in scores["hypotheses"]), encoding="utf-8")
    print(f"BLEU {scores['bleu']:.2f} chrF {scores['chrf']:.2f}")


def cmd_run(args: argparse.Namespace) -> None:
    if args.beam < 1:
        raise UserError(f"--beam must be at least 1, got {args.beam}")
    model, tokenizer, _ = load_translator(args.checkpoint, args.device)
    if args.text:
        for line in translate(model, tokenizer, args.text, beam_size=args.beam):
            print(line, flush=True)
        return
    for line in sys.stdin:  # one at a time, so a pipe gets each translation as soon as it is ready
        text = line.strip()
        print(translate(model, tokenizer, [text], beam_size=args.beam)[0] if text else "", flush=True)
