"""TranslationTask under the shared engine: pure batches, the §5.4 loss, evaluation, exact resume,
and BLEU on detokenised text."""

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fromscratch.checkpoints.runs import read_run
from fromscratch.engine import Trainer
from fromscratch.engine.checkpoint import checkpoint_dir, load_model_weights
from fromscratch.engine.metrics import read_csv
from fromscratch.errors import UserError
from fromscratch.transformer.data import load_corpora
from fromscratch.transformer.model import Transformer, TransformerConfig
from fromscratch.transformer.tokenizer import BPETokenizer
from fromscratch.transformer.training import TranslationTask, paper_train_config
from fromscratch.transformer.translation import evaluate_bleu, load_translator


@pytest.fixture(scope="module")
def corpora():
    train, test = load_corpora(["demo:train"]), load_corpora(["demo:test"])
    return train.select(range(400)), test.select(range(40))


@pytest.fixture(scope="module")
def tokenizer(corpora):
    train, _ = corpora
    return BPETokenizer.train(train.src + train.tgt, vocab_size=400)


def make_task(corpora, tokenizer, seed=0, batch_tokens=300, bleu_samples=8, **kw):
    config = TransformerConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, d_model=32, n_heads=2,
                                           d_ff=64, max_seq_len=64)
    return TranslationTask(*corpora, tokenizer, config, batch_tokens=batch_tokens, seed=seed,
                            bleu_samples=bleu_samples, **kw)


def test_max_tokens_shapes_the_training_pairs_and_the_validation_pairs_stay_whole(corpora, tokenizer):
    """--max-tokens skips long training pairs; validation skips only what the model's position
    table cannot hold, so that a run's validation loss is on the same pairs whatever the limit."""
    train, valid = corpora
    lengths = [max(len(tokenizer.encode(s)), len(tokenizer.encode(t))) for s, t in zip(valid.src, valid.tgt)]
    limit = sorted(lengths)[len(lengths) // 2]  # about half the validation pairs are longer
    task = make_task(corpora, tokenizer, max_tokens=limit + 1)
    whole = make_task(corpora, tokenizer)
    assert task.max_tokens == limit
    assert 0 < len(task.train_pairs) < len(whole.train_pairs)
    assert max(task.train_pairs.src_lengths.max(), task.train_pairs.tgt_lengths.max()) <= limit
    assert len(task.valid_pairs) == len(whole.valid_pairs) == sum(n <= 63 for n in lengths)
    assert max(lengths) > limit


def engine_config(out, **kw):
    settings = dict(out_dir=str(out), max_steps=16, lr=1.0, warmup_steps=8, noam_d_model=32, eval_every=8,
                    save_every=8, batch_size=1, device="cpu")
    return paper_train_config(**{**settings, **kw})


def test_global_batch_is_a_pure_function_of_the_step(corpora, tokenizer):
    a, b = make_task(corpora, tokenizer), make_task(corpora, tokenizer)
    for step in range(1, 40):  # a went through several epochs first
        a.global_batch(step)
    for step in (1, 7, 39):
        for key in ("src", "tgt_in", "tgt_out"):
            assert torch.equal(a.global_batch(step)[key], b.global_batch(step)[key])
    assert not torch.equal(a.global_batch(7)["src"], a.global_batch(8)["src"]) or \
        a.global_batch(7)["src"].shape != a.global_batch(8)["src"].shape
    batch = a.global_batch(3)
    assert batch["src"].numel() <= 300 and batch["tgt_in"].numel() <= 300
    shifted = batch["tgt_in"][:, 1:] != 0  # the decoder input is the target shifted right
    assert torch.equal(batch["tgt_in"][:, 1:][shifted], batch["tgt_out"][:, :-1][shifted])


def test_model_initialisation_depends_on_seed_only(corpora, tokenizer):
    torch.manual_seed(123)
    a = make_task(corpora, tokenizer, seed=4)
    state = torch.get_rng_state()
    b = make_task(corpora, tokenizer, seed=4)
    assert torch.equal(state, torch.get_rng_state())  # building a task leaves the global RNG alone
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_loss_is_label_smoothed_sum_over_target_tokens(corpora, tokenizer):
    task = make_task(corpora, tokenizer)
    batch = task.global_batch(1)
    loss, n = task.loss(task.model.eval(), batch)
    assert n == int((batch["tgt_out"] != 0).sum())
    logits = task.model(batch["src"], batch["tgt_in"]).flatten(0, 1)
    target = batch["tgt_out"].flatten()
    real = target != 0
    log_p = logits[real].log_softmax(-1)
    nll = -log_p.gather(1, target[real, None]).sum()
    uniform = -log_p.mean(dim=1).sum()  # ε spread over the whole vocabulary
    torch.testing.assert_close(loss, 0.9 * nll + 0.1 * uniform, rtol=1e-5, atol=1e-4)
    plain, _ = task.loss(task.model, batch, label_smoothing=0.0)
    torch.testing.assert_close(plain / n, F.cross_entropy(logits[real], target[real]), rtol=1e-5, atol=1e-5)
    smoother = make_task(corpora, tokenizer, label_smoothing=0.25)  # --label-smoothing: the task's own ε
    loss, _ = smoother.loss(smoother.model.eval(), batch)
    torch.testing.assert_close(loss, 0.75 * nll + 0.25 * uniform, rtol=1e-5, atol=1e-4)
    metrics = make_task(corpora, tokenizer, label_smoothing=0.0).evaluate(task.model, step=1)
    assert metrics["val_loss"] == metrics["val_nll"]  # unsmoothed, val_loss is the NLL
    assert smoother.evaluate(task.model, step=1)["val_nll"] == metrics["val_nll"]


def test_evaluate_is_deterministic_and_leaves_rng_alone(corpora, tokenizer):
    task = make_task(corpora, tokenizer)
    state = torch.get_rng_state()
    first = task.evaluate(task.model.eval(), step=1)
    assert torch.equal(state, torch.get_rng_state())
    assert first == task.evaluate(task.model, step=1)
    assert set(first) == {"val_loss", "val_nll", "val_ppl", "val_bleu", "val_chrf"}
    assert math.isclose(first["val_ppl"], math.exp(first["val_nll"]), rel_tol=1e-5)
    assert first["val_nll"] > 0.8 * math.log(tokenizer.vocab_size)  # untrained: near uniform


def test_flops_per_token_counts_more_than_the_dense_layers(corpora, tokenizer):
    task = make_task(corpora, tokenizer)
    layers = sum(p.numel() for m in (task.model.encoder_layers, task.model.decoder_layers) for p in m.parameters())
    assert 6 * layers < task.flops_per_token() < 6 * 4 * sum(p.numel() for p in task.model.parameters())


def test_training_lowers_the_loss_and_resume_is_exact(corpora, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "_plot", lambda self: None)  # loss.png is the engine's business, and slow
    # (No BLEU during these evaluations: greedy decoding of an untrained model is the slow part.)
    straight = Trainer(make_task(corpora, tokenizer, bleu_samples=0), engine_config(tmp_path / "a")).fit()
    rows = read_csv(tmp_path / "a" / "metrics.csv")
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    evals = read_csv(tmp_path / "a" / "eval.csv")
    assert [e["step"] for e in evals] == [8, 16] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert straight["eval"]["val_loss"] == evals[1]["val_loss"]
    for name in ("tokenizer.json", "translate_data.json", "model_config.json", "checkpoints.json", "run.json"):
        assert (tmp_path / "a" / name).exists(), name

    Trainer(make_task(corpora, tokenizer, bleu_samples=0), engine_config(tmp_path / "b", max_steps=8)).fit()
    resumed_task = make_task(corpora, tokenizer, bleu_samples=0)
    resumed_task.check_resume(tmp_path / "b")
    Trainer(resumed_task, engine_config(tmp_path / "b", resume=True)).fit()
    a = load_model_weights(checkpoint_dir(tmp_path / "a") / "model.safetensors")
    b = load_model_weights(checkpoint_dir(tmp_path / "b") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    changed = make_task(corpora, tokenizer, batch_tokens=301, bleu_samples=0)
    with pytest.raises(UserError, match="batch_tokens 300 → 301"):
        changed.check_resume(tmp_path / "b")

    model, tok = load_translator(tmp_path / "a")
    assert tok.vocab_size == tokenizer.vocab_size
    state, _, step_dir, run_dir = read_run(tmp_path / "a", "transformer")
    assert run_dir == tmp_path / "a" and step_dir == checkpoint_dir(tmp_path / "a", "best")  # the best one
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    single, _ = load_translator(checkpoint_dir(tmp_path / "a", "latest"))  # one checkpoint dir
    assert torch.equal(single.src_embedding.weight, a["src_embedding.weight"])
    with pytest.raises(UserError):
        load_translator(tmp_path / "nothing")


class Oracle(torch.nn.Module):
    """A stand-in model whose `generate` returns the reference translation of each source."""

    def __init__(self, tokenizer, pairs):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = TransformerConfig(vocab_size=tokenizer.vocab_size, d_model=8, n_heads=2, max_seq_len=128)
        self.tokenizer = tokenizer
        self.answers = {tuple(tokenizer.encode(s)): tokenizer.encode(t) for s, t in pairs}

    def generate(self, src, beam_size=1, length_penalty=0.6):
        rows = [self.answers[tuple(i for i in row if i > 2)] + [2] for row in src.tolist()]
        out = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
        return out


def test_bleu_is_computed_on_detokenised_text_in_order(corpora, tokenizer):
    _, test = corpora
    oracle = Oracle(tokenizer, zip(test.src, test.tgt))
    result = evaluate_bleu(oracle, tokenizer, test.src, test.tgt, beam_size=1, batch_size=7)
    assert result["hypotheses"] == test.tgt  # exact text, original order despite length sorting
    assert result["bleu"] == pytest.approx(100.0) and result["chrf"] == pytest.approx(100.0)
    shuffled = evaluate_bleu(oracle, tokenizer, test.src, test.tgt[1:] + test.tgt[:1], beam_size=1)
    assert shuffled["bleu"] < 30
    with pytest.raises(UserError, match="references"):
        evaluate_bleu(oracle, tokenizer, test.src, test.tgt[:-1])


@pytest.mark.slow
def test_train_demo_smoke(tmp_path, monkeypatch):
    """`fromscratch demo`'s translation part runs end to end (the full 500 steps are measured by the
    demo itself; here a few steps only)."""
    from fromscratch.transformer.training import train_demo

    monkeypatch.setattr(Trainer, "_plot", lambda self: None)
    result = train_demo(tmp_path / "demo", max_steps=20, quiet=True, device="cpu", n_examples=3)
    assert result["steps"] == 20 and result["test_pairs"] == 275
    assert 0 <= result["bleu"] <= 100 and 0 <= result["chrf"] <= 100
    assert [set(e) for e in result["examples"]] == [{"source", "reference", "translation"}] * 3
    assert (tmp_path / "demo" / "tokenizer.json").exists()


def test_averaging_the_last_checkpoints_is_their_element_wise_mean(tmp_path):
    """§6.1: one model whose weights are the mean of the run's last N checkpoints."""
    from fromscratch.checkpoints.runs import average_last_checkpoints
    from fromscratch.engine.checkpoint import load_model_weights
    from fromscratch.transformer import Transformer

    corpora = load_corpora(["demo:train"]), load_corpora(["demo:test"])
    tokenizer = BPETokenizer.train(corpora[0].src[:500] + corpora[0].tgt[:500], vocab_size=300)
    task = TranslationTask(*corpora, tokenizer, TransformerConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size),
                           batch_tokens=300, bleu_samples=0)
    config = paper_train_config(out_dir=str(tmp_path / "run"), max_steps=6, eval_every=6, save_every=2,
                                keep_last=3, device="cpu", noam_d_model=64)
    Trainer(task, config, command=["test"]).fit()
    steps = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(steps) == 3
    weights = [load_model_weights(s / "model.safetensors") for s in steps[-2:]]
    averaged, _, chosen = average_last_checkpoints(tmp_path / "run", 2, "transformer")
    assert chosen == steps[-2:]
    name = "decoder_layers.0.feed_forward.w_1.weight"
    torch.testing.assert_close(averaged[name], (weights[0][name] + weights[1][name]) / 2)
    model = Transformer.from_pretrained(tmp_path / "run", average=2)
    torch.testing.assert_close(model.state_dict()[name], averaged[name])
    with pytest.raises(UserError, match="keeps 3 checkpoint"):
        average_last_checkpoints(tmp_path / "run", 4, "transformer")


def test_train_with_no_settings_takes_the_cpu_recipe_and_a_given_flag_wins(tmp_path):
    """`translate train --train ... --valid ... --out DIR` with no other flag is the one-hour CPU
    recipe (RECIPES["cpu"]); a setting given explicitly replaces the recipe's."""
    import json

    from fromscratch.transformer import train
    from fromscratch.transformer.training import RECIPES

    cpu = RECIPES["cpu"]
    train("demo:train", "demo:test", tmp_path / "recipe", max_steps=1, bleu_samples=0, device="cpu")
    run = json.loads((tmp_path / "recipe" / "run.json").read_text())
    expected = TransformerConfig.from_preset(cpu["model"]["preset"], norm_first=cpu["model"]["norm_first"])
    assert (run["model_config"]["d_model"], run["model_config"]["norm_first"]) == (expected.d_model, True)
    assert {name: run["train_config"][name] for name in cpu["engine"]} == cpu["engine"]
    data = json.loads((tmp_path / "recipe" / "translate_data.json").read_text())
    assert data["max_tokens"] == cpu["model"]["max_tokens"] - 1  # a side and its </s> (or <s>) fit
    train("demo:train", "demo:test", tmp_path / "given", preset="tiny", lr=0.5, max_tokens=32, max_steps=1,
          bleu_samples=0, device="cpu", weight_decay=0.0)
    run = json.loads((tmp_path / "given" / "run.json").read_text())
    assert run["model_config"]["d_model"] == TransformerConfig.from_preset("tiny").d_model
    assert run["train_config"]["lr"] == 0.5 and run["train_config"]["warmup_steps"] == cpu["engine"]["warmup_steps"]
    assert run["train_config"]["weight_decay"] == 0.0 < cpu["engine"]["weight_decay"]  # a given 0 wins too
    assert json.loads((tmp_path / "given" / "translate_data.json").read_text())["max_tokens"] == 31


def test_shape_flags_replace_the_presets_sizes_and_a_resume_must_repeat_them(tmp_path):
    """`--d-model 32 --n-heads 2 --n-decoder-layers 1 --activation gelu` on `tiny`: the run's model
    has those sizes and the preset's others; bad sizes fail before any work; resuming with other
    sizes is refused."""
    import json

    from fromscratch.transformer import train

    shape = {"d_model": 32, "n_heads": 2, "n_encoder_layers": None, "n_decoder_layers": 1, "d_ff": None}
    # No cooldown: the 1-step run is resumed for a second step.
    common = dict(preset="tiny", bleu_samples=0, device="cpu", eval_every=1, save_every=1, cooldown=0)
    train("demo:train", "demo:test", tmp_path / "run", shape=shape, activation="gelu", max_steps=1, **common)
    config = json.loads((tmp_path / "run" / "model_config.json").read_text())
    tiny = TransformerConfig.from_preset("tiny")
    assert (config["d_model"], config["n_heads"], config["n_decoder_layers"]) == (32, 2, 1)
    assert config["activation"] == "gelu" and tiny.activation == "relu"
    assert (config["n_encoder_layers"], config["d_ff"]) == (tiny.n_encoder_layers, tiny.d_ff)
    assert len(Transformer.from_pretrained(tmp_path / "run").decoder_layers) == 1
    with pytest.raises(UserError, match=re.escape("d_model=32 (asked now: 64)")):
        train("demo:train", "demo:test", tmp_path / "run", max_steps=2, resume=True, **common)
    train("demo:train", "demo:test", tmp_path / "run", shape=shape, activation="gelu", max_steps=2, resume=True,
          **common)
    with pytest.raises(UserError, match=re.escape("activation 'tanh': choose one of relu, swish")):
        train("demo:train", "demo:test", tmp_path / "bad", activation="tanh", max_steps=1, **common)
    assert not (tmp_path / "bad").exists()
    for bad, message in (({"d_model": 0}, "d_model must be at least 1, got 0"),
                         ({"d_model": 30}, "d_model=30 must be even and divisible by n_heads=4"),
                         ({"width": 8}, "shape 'width': choose among d_model, ")):
        with pytest.raises(UserError, match=re.escape(message)):
            train("demo:train", "demo:test", tmp_path / "bad", shape=bad, max_steps=1, **common)
        assert not (tmp_path / "bad").exists()


def two_file_corpus():
    """Twelve pairs from "short.en" (lines 1-4) and "long.en" (lines 1-8)."""
    from fromscratch.transformer.data import ParallelCorpus

    corpus = ParallelCorpus([], [])
    for i in range(4):
        corpus.add(f"I see {i} cats.", f"Saya melihat {i} kucing.", "short.en", i + 1)
    for i in range(8):
        corpus.add(f"We have {i} big red houses here.", f"Kami punya {i} rumah merah besar di sini.", "long.en", i + 1)
    return corpus


def test_bpe_dropout_segments_each_batch_anew_as_a_function_of_the_step(corpora):
    """--bpe-dropout: a step's batch is the same pairs as without it, each side segmented anew
    (finer, decoding to the same text), a pure function of (seed, step); tagged sources keep their
    tag; a side that comes out longer than --max-tokens keeps its plain BPE; validation is plain."""
    _, valid = corpora
    train = two_file_corpus()
    tokenizer = BPETokenizer.train(train.src + train.tgt + valid.src + valid.tgt, vocab_size=400, source_tag="short")
    whole = make_task((train, valid), tokenizer, batch_tokens=40).train_pairs
    longest = int(max(whole.src_lengths.max(), whole.tgt_lengths.max()))
    # --max-tokens counts </s>: the longest plain side fits exactly, and its finer splits do not.
    plain = make_task((train, valid), tokenizer, batch_tokens=40, max_tokens=longest + 1)
    a, b = (make_task((train, valid), tokenizer, batch_tokens=40, max_tokens=longest + 1, bpe_dropout=0.5)
            for _ in range(2))
    assert a.max_tokens == longest
    assert a.fingerprint["bpe_dropout"] == 0.5 and "bpe_dropout" not in plain.fingerprint
    finer = kept_plain = 0
    for step in range(1, 13):
        batches = plain.global_batch(step), a.global_batch(step), b.global_batch(step)
        assert all(torch.equal(batches[1][k], batches[2][k]) for k in ("src", "tgt_in", "tgt_out"))
        for side in ("src", "tgt_out"):
            for plain_row, row in zip(batches[0][side].tolist(), batches[1][side].tolist()):
                plain_row, row = [i for i in plain_row if i], [i for i in row if i]
                assert tokenizer.decode(row) == tokenizer.decode(plain_row)
                assert (row[0] == 4) == (plain_row[0] == 4)  # the tag, on the "short" file's sources only
                assert len(row) - 1 <= a.max_tokens  # </s> aside
                finer += len(row) > len(plain_row)
                kept_plain += row == plain_row and len(row) - 1 == longest
    assert finer > 6 and kept_plain > 0
    assert all(np.array_equal(x, y) for x, y in zip(a.valid_batches, plain.valid_batches))
    assert np.array_equal(a.valid_pairs.src, plain.valid_pairs.src)
    assert np.array_equal(a.valid_pairs.tgt, plain.valid_pairs.tgt)


def test_repeat_puts_a_corpus_n_times_into_every_epoch(corpora, tokenizer):
    """--repeat short=3: one epoch's batches hold each "short" pair three times and each "long"
    pair once; the text and token ids are held once."""
    _, valid = corpora
    train = two_file_corpus()
    task = make_task((train, valid), tokenizer, batch_tokens=40, repeats={"short": 3})
    assert len(task.train_pairs) == 12 and len(task.epoch_pairs) == 4 * 3 + 8
    epoch = task.schedule.epoch_batches(0)
    seen = np.bincount(np.concatenate([task.epoch_pairs[batch] for batch in epoch]), minlength=12)
    assert seen.tolist() == [3] * 4 + [1] * 8
    # The step's batch is the pairs the schedule names (repeated pairs' own tokens).
    batch, rows = task.global_batch(1), task.epoch_pairs[task.schedule(0)]
    first = task.train_pairs.source(int(rows[0])).tolist() + [task.tokenizer.eos_id]
    assert batch["src"][0, :len(first)].tolist() == first
    assert task.fingerprint["repeats"] == {"short": 3}
    plain = make_task((train, valid), tokenizer, batch_tokens=40)
    assert plain.epoch_pairs.tolist() == list(range(12)) and "repeats" not in plain.fingerprint


def test_repeat_counts_take_the_longest_matching_name_and_refuse_bad_names():
    from fromscratch.transformer.data import parse_repeats, repeat_counts

    origins = two_file_corpus().origins
    assert repeat_counts(origins, {"short": 2}).tolist() == [2] * 4 + [1] * 8
    assert repeat_counts(origins, {"s": 2, "sho": 5, "long": 3}).tolist() == [5] * 4 + [3] * 8
    with pytest.raises(UserError, match=r"--repeat tatoeba: no training corpus file name starts with that"):
        repeat_counts(origins, {"tatoeba": 2})
    assert parse_repeats(["tatoeba=4", "iwslt17=2"]) == {"tatoeba": 4, "iwslt17": 2}
    for bad in ("tatoeba", "tatoeba=0", "=3", "tatoeba=two", "tatoeba=-1"):
        with pytest.raises(UserError, match="expected NAME=N"):
            parse_repeats([bad])


def test_tag_starts_the_sources_of_its_corpus_and_every_validation_and_translated_source(corpora):
    """--tag short: the "short" file's training sources start with <short>, the "long" file's do
    not, every validation source does, and `translate` gives the model every source with it."""
    from fromscratch.transformer.data import tagged_pairs
    from fromscratch.transformer.translation import translate

    _, valid = corpora
    train = two_file_corpus()
    tokenizer = BPETokenizer.train(train.src + train.tgt + valid.src + valid.tgt, vocab_size=400, source_tag="short")
    tag = tokenizer.source_prefix
    assert tag == [4]
    task = make_task((train, valid), tokenizer, batch_tokens=40)
    for i, text in enumerate(train.src):
        expected = (tag if i < 4 else []) + tokenizer.encode(text)
        assert task.train_pairs.source(i).tolist() == expected
        assert task.train_pairs.target(i).tolist() == tokenizer.encode(train.tgt[i])  # targets have no tag
    assert all(task.valid_pairs.source(i)[0] == 4 for i in range(len(task.valid_pairs)))
    assert task.fingerprint["tag"] == "short" and "tag" not in make_task(corpora, BPETokenizer.train(
        train.src + train.tgt, vocab_size=300)).fingerprint
    assert tagged_pairs(train.origins, "short").tolist() == [True] * 4 + [False] * 8
    with pytest.raises(UserError, match=r"--tag tatoeba: no training corpus file name starts with that"):
        tagged_pairs(train.origins, "tatoeba")

    seen = []

    class Recorder(Oracle):
        def generate(self, src, beam_size=1, length_penalty=0.6):
            seen.extend(src.tolist())
            return torch.full((len(src), 1), 2)

    translate(Recorder(tokenizer, []), tokenizer, valid.src[:5], beam_size=1)
    assert sorted(tuple(i for i in row if i) for row in seen) == \
        sorted(tuple(tag + tokenizer.encode(s) + [2]) for s in valid.src[:5])


def test_train_with_a_tag_keeps_it_in_the_run_and_refuses_to_resume_without_it(tmp_path):
    """`train(..., tag=NAME)`: the run's tokenizer carries <NAME>, so `load_translator` translates
    with it; resuming with another tag (or none) is refused before any work; "auto" names a file."""
    from fromscratch.transformer import train

    out = tmp_path / "tagged"
    settings = dict(preset="tiny", vocab_size=300, max_steps=1, bleu_samples=0, device="cpu", cooldown=0)
    train("demo:train", "demo:test", out, tag="every", **settings)
    _, tokenizer = load_translator(out)
    assert tokenizer.source_tag == "every" and tokenizer.source_prefix == [4]
    with pytest.raises(UserError, match="trained with --tag every, not no --tag"):
        train("demo:train", "demo:test", out, resume=True, **{**settings, "max_steps": 2})
    with pytest.raises(UserError, match="--tag tatoeba: no training corpus file name starts with that"):
        train("demo:train", "demo:test", tmp_path / "other", tag="tatoeba", **settings)
    train("demo:train", "demo:test", tmp_path / "auto", tag="auto", **settings)  # the one training file
    assert load_translator(tmp_path / "auto")[1].source_tag == "everyday"


def test_train_with_bpe_dropout_records_it_and_a_resume_must_repeat_it(tmp_path):
    """`train(..., bpe_dropout=P)` trains (the run is an ordinary one to translate with), records P
    with its data, and a resume without it, or with a rate outside [0, 1), is refused."""
    from fromscratch.transformer import train

    out = tmp_path / "bpe-dropout"
    settings = dict(preset="tiny", vocab_size=300, bleu_samples=0, device="cpu", cooldown=0)
    result = train("demo:train", "demo:test", out, bpe_dropout=0.1, max_steps=2, **settings)
    assert result["step"] == 2 and load_translator(out)[1].vocab_size == 300
    assert json.loads((out / "translate_data.json").read_text())["bpe_dropout"] == 0.1
    with pytest.raises(UserError, match=r"bpe_dropout 0.1 → None"):
        train("demo:train", "demo:test", out, resume=True, max_steps=3, **settings)
    for bad in (1.0, -0.5):
        with pytest.raises(UserError, match="--bpe-dropout must be a probability"):
            train("demo:train", "demo:test", tmp_path / "bad", bpe_dropout=bad, max_steps=1, **settings)


def test_train_with_label_smoothing_trains_on_that_loss_and_refuses_a_bad_one(tmp_path):
    """`train(..., label_smoothing=ε)`: the run's training and validation losses are smoothed by ε
    (at ε = 0 val_loss is val_nll), it is recorded with the command, and ε outside [0, 1) is
    refused before the corpora are read."""
    from fromscratch.transformer import train

    settings = dict(preset="tiny", vocab_size=300, bleu_samples=0, device="cpu", max_steps=2, eval_every=2)
    result = train("demo:train", "demo:test", tmp_path / "plain", label_smoothing=0.0,
                   command=["fromscratch", "translate", "train", "--label-smoothing", "0"], **settings)
    assert result["step"] == 2 and result["eval"]["val_loss"] == result["eval"]["val_nll"]
    assert "--label-smoothing" in json.loads((tmp_path / "plain" / "run.json").read_text())["command"]
    smoothed = train("demo:train", "demo:test", tmp_path / "smoothed", label_smoothing=0.3, **settings)
    assert abs(smoothed["eval"]["val_loss"] - smoothed["eval"]["val_nll"]) > 1e-3  # the maths: the test above
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(UserError, match=r"--label-smoothing must be in \[0, 1\)"):
            train("missing:corpus", "demo:test", tmp_path / "bad", label_smoothing=bad, **settings)


def test_tag_auto_picks_the_training_file_whose_words_are_most_like_the_validation_targets():
    """closest_corpus: the file whose unigram model (interpolated with all files') gives the
    validation targets the lowest cross-entropy, named without its language suffix; the smaller
    file wins when its words are the validation set's."""
    from fromscratch.transformer.data import ParallelCorpus, closest_corpus

    train = ParallelCorpus([], [])
    for i in range(40):
        train.add(f"The ministry reported growth {i}.", f"Kementerian melaporkan pertumbuhan ekonomi {i} persen.",
                  "data/news.en", i + 1)
    for i in range(6):
        train.add("I love you.", "Aku cinta kamu.", "data/chat.en", i + 1)
    valid = ParallelCorpus(["You and I.", "I miss you."], ["Kamu dan aku.", "Aku rindu kamu."], ["dev.en:1", "dev.en:2"])
    name, entropy = closest_corpus(train, valid)
    assert name == "chat" and set(entropy) == {"chat", "news"} and entropy["chat"] < entropy["news"]
    formal = ParallelCorpus(["Growth."], ["Pertumbuhan ekonomi kementerian."], ["dev.en:1"])
    assert closest_corpus(train, formal)[0] == "news"
    with pytest.raises(UserError, match="no words"):
        closest_corpus(train, ParallelCorpus([""], [""], ["dev.en:1"]))
