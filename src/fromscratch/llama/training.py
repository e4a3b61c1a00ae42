"""Training Llama from scratch on text: the language-modelling task the shared engine drives.

Defaults follow the Llama 2 paper (§2.2): AdamW with β = (0.9, 0.95), weight decay 0.1, a cosine
schedule with warm-up decaying to 10% of the peak, gradient clipping at 1.0.

`train` (what `fromscratch llama train` calls, and what a user calls from Python) checks every
argument before it does any work, then gets a tokenizer (the one given, the run's own on
resume, or a SentencePiece BPE trained on the data), tokenizes the data once into memory-mapped
files (`data.py`), and hands a `LanguageModelTask` to the engine. The run directory then holds,
besides what the engine writes, `tokenizer.model` (or `.json`) and `task.json` (preset, sequence
length, data), so `Llama.from_pretrained(RUN_DIR)` and `fromscratch llama generate --checkpoint
RUN_DIR` work on it. Training goes through the opt-in fast paths (`fast.accelerate`).
"""

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from fromscratch.engine import TrainConfig, Trainer, check_run_state, make_train_config, seed_everything
from fromscratch.engine.checkpoint import read_index, write_json
from fromscratch.engine.distributed import barrier, broadcast_object
from fromscratch.errors import UserError
from fromscratch.llama.config import LlamaConfig
from fromscratch.llama.data import check_sources, is_hub, prepare_token_files, text_files_for_tokenizer
from fromscratch.llama.fast import accelerate
from fromscratch.llama.model import Llama
from fromscratch.llama.tokenizer import Tokenizer, train_tokenizer

DEFAULTS = TrainConfig(
    max_steps=2000, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=100, schedule="cosine",
    betas=(0.9, 0.95), weight_decay=0.1, clip_grad=1.0, eval_every=200, save_every=200,
)
TASK_FILE = "task.json"  # the llama-specific settings of a run, checked again on --resume
MIN_VOCAB = 3 + 256 + 1  # unk, bos, eos, the 256 byte-fallback pieces, and at least one more


class LanguageModelTask:
    """Next-token prediction on random windows of a memory-mapped token stream.

    Built in two steps so the engine can check the run before any data is prepared:
    `LanguageModelTask(config, ...)` makes the model; `use_data(...)` attaches the tokens.
    """

    best_metric, best_mode = "val_loss", "min"
    model_name = "llama"

    def __init__(self, model_config: LlamaConfig, batch_size: int, seq_len: int, seed: int,
                 eval_rows: int = 64, settings: dict | None = None, model_class: type = Llama):
        self.model_config = model_config
        self.model = accelerate(model_class(model_config))
        self.batch_size, self.seq_len, self.seed, self.max_eval_rows = batch_size, seq_len, seed, eval_rows
        self.settings = settings or {}
        self.train_tokens = self.val_tokens = self.tokenizer = self.tokenizer_path = None

    def use_data(self, train_tokens, val_tokens, tokenizer: Tokenizer, tokenizer_path: Path) -> None:
        if len(train_tokens) <= self.seq_len + 1 or len(val_tokens) <= self.seq_len + 1:
            raise UserError(
                f"the data is too short for --seq-len {self.seq_len}: {len(train_tokens)} training and "
                f"{len(val_tokens)} validation tokens (the last 5% of each file); give more text or a "
                "shorter --seq-len"
            )
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.tokenizer, self.tokenizer_path = tokenizer, Path(tokenizer_path)
        self.eval_rows = min(self.max_eval_rows, (len(val_tokens) - 1) // self.seq_len)

    def global_batch(self, step: int) -> dict[str, torch.Tensor]:
        # The batch is a pure function of (seed, step): the data position needs no saving.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(len(self.train_tokens) - self.seq_len, (self.batch_size,), generator=generator)
        rows = np.stack([self.train_tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
        rows = torch.from_numpy(rows.astype(np.int64))
        return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}  # (B, T) each

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        # Summed cross-entropy without materialising the (B, T, vocab) logits (Llama.loss).
        loss = model(batch["inputs"], targets=batch["targets"], reduction="sum")
        return loss, batch["targets"].numel()

    @torch.no_grad()
    def evaluate(self, model, step: int) -> dict[str, float]:
        """Mean loss over the first `eval_rows` consecutive windows of the validation tokens,
        and a short sample continuing its first 8 tokens, printed."""
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for start in range(0, self.eval_rows, self.batch_size):
            rows = range(start, min(start + self.batch_size, self.eval_rows))
            window = np.stack([self.val_tokens[r * self.seq_len : r * self.seq_len + self.seq_len + 1] for r in rows])
            ids = torch.from_numpy(window.astype(np.int64)).to(device)
            loss, n = self.loss(model, {"inputs": ids[:, :-1], "targets": ids[:, 1:]})
            total, count = total + loss.item(), count + n
        val_loss = total / count
        prompt = [int(t) for t in self.val_tokens[:8]]
        n_new = min(40, self.model_config.max_seq_len - len(prompt))
        sample = self.model.generate([prompt], max_new_tokens=n_new, temperature=0.8, top_k=50, seed=step)[0]
        if _is_main_process():
            from tqdm.auto import tqdm

            tqdm.write(f"  sample @ {step}: {self.tokenizer.decode(sample)!r}")  # above the progress bar
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}

    def save_artifacts(self, run_dir: Path) -> None:
        """The tokenizer (as tokenizer.model / tokenizer.json) and task.json, beside the checkpoints."""
        run_dir = Path(run_dir)
        name = "tokenizer.json" if self.tokenizer_path.suffix == ".json" else "tokenizer.model"
        target = run_dir / name
        if self.tokenizer_path.resolve() != target.resolve():
            shutil.copyfile(self.tokenizer_path, target)
        for stale in {"tokenizer.json", "tokenizer.model"} - {name}:  # left by an earlier attempt
            (run_dir / stale).unlink(missing_ok=True)
        if not (run_dir / TASK_FILE).exists() or not read_index(run_dir).get("latest"):
            write_json(run_dir / TASK_FILE, self.settings)

    def flops_per_token(self) -> float:
        c = self.model_config
        n_params = sum(p.numel() for p in self.model.parameters()) - c.vocab_size * c.d_model
        return 6 * n_params + 12 * c.n_layers * c.d_model * self.seq_len  # Kaplan et al. 2020, App. B

    def fsdp_modules(self):
        return list(self.model.layers)


def _is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def run_directory_tokenizer(run_dir: Path) -> Path | None:
    return next((p for p in (run_dir / "tokenizer.model", run_dir / "tokenizer.json") if p.exists()), None)


def _data_names(sources: list[str]) -> list[str]:
    """Sources as recorded in task.json: local files by absolute path, so a resume from
    another working directory still matches."""
    return [s if is_hub(s) else str(Path(s).resolve()) for s in sources]


def _check_same_task(run_dir: Path, settings: dict) -> None:
    """--resume must repeat the settings the run was started with; the engine checks its own."""
    path = run_dir / TASK_FILE
    if not path.exists():
        return
    recorded = json.loads(path.read_text())
    flags = {"preset": "--preset", "seq_len": "--seq-len", "data": "--data"}
    problems = [
        f"{flag} {_show(recorded[key])} (asked now: {_show(settings[key])})"
        for key, flag in flags.items()
        if key in recorded and recorded[key] != settings[key]
    ]
    if problems:
        raise UserError(
            f"--resume: the run in {run_dir} was started with " + "; ".join(problems)
            + f". Repeat the original flags (recorded in {path}) or use a new --out"
        )


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _on_process_zero(dist, work):
    """Run `work()` on process 0 only (the others wait), failing on every process if it fails."""
    failure, message = None, None
    if dist.is_main:
        try:
            work()
        except BaseException as e:
            failure, message = e, str(e)
    message = broadcast_object(message, dist)
    if failure is not None:
        raise failure
    if message is not None:
        raise UserError(f"process 0 failed: {message}")
    barrier(dist)


def train(data: str | list[str], out: str, *, preset: str = "tiny", tokenizer: str | None = None,
          vocab_size: int = 2048, seq_len: int | None = None, command: list[str] | None = None,
          **engine) -> dict:
    """Train a Llama on text files (or `hf:NAME[:SPLIT[:FIELD]]` hub datasets) into the run
    directory `out`; what `fromscratch llama train` runs.

    preset: the model size (LlamaConfig presets); tokenizer: a SentencePiece `.model` or
    `tokenizer.json` (default: train a BPE of `vocab_size` pieces on the data); seq_len: the
    training context (default: min(preset's, 256)); engine: the shared engine's options
    (`max_steps`, `lr`, `batch_size`, `resume`, ... — see `fromscratch.engine.TrainConfig`).
    Returns the engine's result: {"step", "train", "eval", "best", "run_dir"}.
    """
    return _train(LanguageModelTask, LlamaConfig, [data] if isinstance(data, str) else list(data), out, preset,
                  tokenizer, vocab_size, seq_len, command, engine)


def _train(task_class, config_class, data, out, preset, tokenizer, vocab_size, seq_len, command, engine,
           model_overrides: dict | None = None) -> dict:
    """`train` for Llama and for the models built on it (the MoE): their task and config classes."""
    # 1. Every argument is checked before anything is computed or written.
    config = make_train_config(DEFAULTS, out, **engine)
    config.check_before_work()
    run_dir = Path(config.out_dir)
    check_sources(data)
    preset_config = config_class.from_preset(preset, **(model_overrides or {}))  # an unknown preset fails here
    if seq_len is not None and seq_len < 1:
        raise UserError(f"--seq-len must be at least 1, got {seq_len}")
    seq_len = seq_len or min(preset_config.max_seq_len, 256)
    check_run_state(run_dir, config.resume, task_class.model_name)  # before any data is read
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun (the engine checks again)
    if config.batch_size % (processes * config.grad_accum):
        raise UserError(
            f"--batch-size {config.batch_size} is not divisible by processes × --grad-accum = "
            f"{processes} × {config.grad_accum}; the global batch must split evenly"
        )
    if tokenizer and not Path(tokenizer).is_file():
        raise UserError(f"--tokenizer {tokenizer}: no such file")
    # On --resume the run's own copy of its tokenizer, so the token ids cannot change.
    tokenizer_path = (run_directory_tokenizer(run_dir) if config.resume else None) or (
        Path(tokenizer) if tokenizer else None
    )
    if config.resume and tokenizer_path is None:
        raise UserError(f"--resume: {run_dir} has lost its tokenizer.model / tokenizer.json; pass --tokenizer")
    if config.resume and tokenizer and Path(tokenizer).read_bytes() != tokenizer_path.read_bytes():
        raise UserError(
            f"--resume: --tokenizer {tokenizer} is not the tokenizer the run in {run_dir} was started "
            f"with ({tokenizer_path}); drop --tokenizer to use the run's own"
        )
    if tokenizer_path is None and vocab_size < MIN_VOCAB:
        raise UserError(f"--vocab-size {vocab_size}: a byte-fallback BPE needs at least {MIN_VOCAB} pieces")
    vocab_size = Tokenizer(tokenizer_path).vocab_size if tokenizer_path else vocab_size
    model_config = config_class.from_preset(
        preset, **{**(model_overrides or {}), "vocab_size": vocab_size, "max_seq_len": max(preset_config.max_seq_len, seq_len)}
    )
    settings = {"preset": preset, "seq_len": seq_len, "data": _data_names(data)}
    if config.resume:
        _check_same_task(run_dir, settings)
    seed_everything(config.seed)  # the initial weights depend on the seed alone
    task = task_class(model_config, config.batch_size, seq_len, config.seed, settings=settings)
    trainer = Trainer(task, config, command)  # the engine's checks: batch split, flags on --resume, ...

    # 2. Work. Under torchrun process 0 trains the tokenizer and tokenizes; the others wait.
    must_train_tokenizer = tokenizer_path is None
    tokenizer_path = tokenizer_path or run_dir / "tokenizer.model"

    def prepare():
        run_dir.mkdir(parents=True, exist_ok=True)
        if must_train_tokenizer:
            files = text_files_for_tokenizer(data, run_dir / "data")
            print(f"training a {vocab_size}-piece SentencePiece BPE tokenizer on {', '.join(map(str, files))}")
            train_tokenizer(files, vocab_size, run_dir / "tokenizer")
            pieces = Tokenizer(tokenizer_path).vocab_size
            if pieces != vocab_size:
                raise UserError(f"the trained tokenizer has {pieces} pieces, not --vocab-size {vocab_size}")
        prepare_token_files(data, Tokenizer(tokenizer_path), tokenizer_path, run_dir / "data")

    _on_process_zero(trainer.dist, prepare)
    tokenizer = Tokenizer(tokenizer_path)
    train_tokens, val_tokens = prepare_token_files(data, tokenizer, tokenizer_path, run_dir / "data")
    if trainer.dist.is_main:
        print(f"{len(train_tokens):,} training tokens, {len(val_tokens):,} validation tokens; "
              f"model: {preset}, {task.model.num_parameters():,} parameters")
    task.use_data(train_tokens, val_tokens, tokenizer, tokenizer_path)
    result = trainer.fit()
    if trainer.dist.is_main:
        print(f"checkpoints, metrics.csv, eval.csv and loss.png are in {run_dir}")
    return result
