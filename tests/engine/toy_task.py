"""A tiny language-model task for testing the engine without any real model.

A bigram-ish MLP with dropout on a fixed random token stream: small enough to train in
milliseconds, random enough (dropout, data sampling by step) to catch a resume that is not exact.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ToyConfig:
    vocab_size: int = 32
    d_model: int = 16
    dropout: float = 0.1

    def to_dict(self):
        return asdict(self)


class ToyModel(nn.Module):
    def __init__(self, config: ToyConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.hidden = nn.Linear(config.d_model, config.d_model)
        self.out = nn.Linear(config.d_model, config.vocab_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, ids):
        return self.out(self.dropout(torch.relu(self.hidden(self.embed(ids)))))


class ToyTask:
    model_name = "toy"

    def __init__(self, batch_size=8, seq_len=16, seed=0, config=None, nan_at_step=None):
        torch.manual_seed(seed)
        self.model_config = config or ToyConfig()
        self.model = ToyModel(self.model_config)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        gen = torch.Generator().manual_seed(1234)
        # A learnable stream: token t+1 = (3 * token t + 1) mod V, with 10% noise.
        stream = [0]
        for _ in range(4095):
            nxt = (3 * stream[-1] + 1) % self.model_config.vocab_size
            if torch.rand((), generator=gen) < 0.1:
                nxt = int(torch.randint(self.model_config.vocab_size, (), generator=gen))
            stream.append(nxt)
        self.data = torch.tensor(stream)
        self.nan_at_step = nan_at_step

    def global_batch(self, step):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(len(self.data) - self.seq_len - 1, (self.batch_size,), generator=gen)
        rows = torch.stack([self.data[s : s + self.seq_len + 1] for s in starts])
        return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "step": step}

    def loss(self, model, batch):
        logits = model(batch["inputs"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), reduction="sum")
        if self.nan_at_step is not None and batch["step"] >= self.nan_at_step:
            loss = loss * float("nan")
        return loss, batch["targets"].numel()

    def evaluate(self, model, step):
        batch = self.global_batch(10**9)
        loss, n = self.loss(model, batch)
        return {"val_loss": loss.item() / n}

    def flops_per_token(self):
        return 6 * sum(p.numel() for p in self.model.parameters())
