"""The README figures: positional-encoding heatmap and the attention map of a translation."""

import torch

from fromscratch.transformer.figures import cross_attention_weights, plot_cross_attention, plot_positional_encoding
from fromscratch.transformer.model import Transformer, TransformerConfig


class CharTokenizer:
    """The two methods the figures use, as the project's BPETokenizer has them."""

    def encode(self, text):
        return [3 + ord(c) - ord("a") for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + i - 3) for i in ids if i > 2)


def model():
    config = TransformerConfig.from_preset("tiny", vocab_size=29, dropout=0.0, share_embeddings=False)
    return Transformer(config).eval()


def test_cross_attention_weights_are_distributions_over_the_real_source():
    m = model()
    src = torch.tensor([[5, 6, 7, 2, 0, 0], [5, 6, 7, 8, 9, 2]])
    out = m.generate(src, max_new_tokens=6)
    weights = cross_attention_weights(m, src, out)
    assert len(weights) == 2 and weights[0].shape == (2, 4, out.size(1), 6)
    torch.testing.assert_close(weights[-1].sum(-1), torch.ones(2, 4, out.size(1)))
    assert (weights[0][0, ..., 4:] == 0).all()  # padding gets no attention
    assert all(not layer.cross_attention.record_weights for layer in m.decoder_layers)  # switched off again


def test_figures_are_written(tmp_path):
    assert plot_positional_encoding(tmp_path / "pe.png", n_positions=32, d_model=64).stat().st_size > 1000
    path = plot_cross_attention(model(), CharTokenizer(), "hello", tmp_path / "attention.png", head=1)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_main_draws_the_readme_figures_and_reports_user_errors(tmp_path, capsys):
    from fromscratch.transformer.figures import main

    assert main(["--out", str(tmp_path)]) == 0  # without a checkpoint: the positional encoding only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["positional_encoding.png"]
    assert main(["--out", str(tmp_path), "--checkpoint", str(tmp_path / "no-run")]) == 2
    assert "figures: error:" in capsys.readouterr().err
