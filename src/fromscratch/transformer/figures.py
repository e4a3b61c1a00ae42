"""Figures for the Transformer README: the sinusoidal positional encoding (§3.5) and the
encoder–decoder attention of a translation (the alignments of the paper's appendix figures).

    python -m fromscratch.transformer.figures --out DIR                   # positional encoding only
    python -m fromscratch.transformer.figures --out DIR --checkpoint RUN  # + a trained model's attention

RUN is a `fromscratch translate train` run directory, e.g. `runs/demo/translate` after
`fromscratch demo`. Without --out the figures go to this package's `figures/`, where the README
finds them. matplotlib is an optional dependency (`pip install fromscratch[plot]`); it is
imported only when a figure is drawn.
"""

import argparse
import sys
from pathlib import Path

import torch

from fromscratch.engine.plot import pyplot, save_figure
from fromscratch.errors import UserError
from fromscratch.transformer.decoding import shifted_right
from fromscratch.transformer.model import Transformer, sinusoidal_positions


def plot_positional_encoding(path, n_positions: int = 128, d_model: int = 512) -> Path:
    """Heatmap of PE(pos, ·), the sine dimensions 2i and the cosine dimensions 2i+1 side by side
    (interleaved, they would look like a barcode): fast sinusoids at small i, slow ones at large i."""
    plt = pyplot()
    pe = sinusoidal_positions(n_positions, d_model).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, values, name in zip(axes, (pe[:, 0::2], pe[:, 1::2]), ("PE(pos, 2i) = sin", "PE(pos, 2i+1) = cos")):
        image = ax.imshow(values, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_xlabel("i  (wavelength 2π·10000^(2i/d_model))")
        ax.set_title(name, fontsize=10)
    axes[0].set_ylabel("position pos")
    fig.suptitle(f"Sinusoidal positional encoding (§3.5), d_model = {d_model}")
    fig.colorbar(image, ax=axes, fraction=0.04)
    return save_figure(fig, path)


def _token_strings(model: Transformer, tokenizer, ids: list[int]) -> list[str]:
    c = model.config
    specials = {c.pad_id: "<pad>", c.bos_id: "<s>", c.eos_id: "</s>"}
    to_text = getattr(tokenizer, "id_to_token", None) or (lambda i: tokenizer.decode([i]))
    return [specials.get(i) or str(to_text(i)) for i in ids]


@torch.no_grad()
def cross_attention_weights(model: Transformer, src_ids: torch.Tensor, out_ids: torch.Tensor) -> list[torch.Tensor]:
    """Each decoder layer's encoder–decoder attention weights, (B, n_heads, T_out, S), while the
    decoder reads [BOS] + out_ids[:, :-1] (teacher forcing: row t is the attention that
    produced out_ids[:, t])."""
    attentions = [layer.cross_attention for layer in model.decoder_layers]
    was_training = model.training
    model.eval()
    try:
        for attention in attentions:
            attention.record_weights = True
        model(src_ids, shifted_right(model, out_ids))
        return [attention.weights for attention in attentions]
    finally:
        for attention in attentions:
            attention.record_weights, attention.weights = False, None
        model.train(was_training)


def plot_cross_attention(model: Transformer, tokenizer, source, path, layer: int = -1, head: int | None = None,
                         beam_size: int = 1) -> Path:
    """Translate `source` and draw the decoder's attention over the source tokens.
    source: a list of token ids, or a string, which becomes tokenizer.encode(source) + [EOS]
    (x₁ … xₙ </s>, as the translation data is built). layer: which decoder layer; head: one
    head, or None for the mean over heads. tokenizer: anything with `encode(text) -> ids` and
    `decode(ids)` or `id_to_token(id)`."""
    plt = pyplot()
    if isinstance(source, str):
        encoded = tokenizer.encode(source)
        source = [*getattr(encoded, "ids", encoded), model.config.eos_id]  # .ids: a `tokenizers.Encoding`
    src = list(source)
    src_ids = torch.tensor([src], device=model.positions.device)
    out_ids = model.generate(src_ids, beam_size=beam_size)
    weights = cross_attention_weights(model, src_ids, out_ids)[layer][0]  # (n_heads, T_out, S)
    weights = weights.mean(dim=0) if head is None else weights[head]

    out = out_ids[0].tolist()
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(src) + 2), max(3, 0.4 * len(out) + 1.5)))
    ax.imshow(weights.float().cpu().numpy(), cmap="viridis", vmin=0, aspect="auto")
    ax.set_xticks(range(len(src)), _token_strings(model, tokenizer, src), rotation=90)
    ax.set_yticks(range(len(out)), _token_strings(model, tokenizer, out))
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    which = "mean of heads" if head is None else f"head {head}"
    ax.set_title(f"Cross-attention, layer {layer % len(model.decoder_layers)}, {which}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


# A held-out pair of the demo corpus (`demo:test`), never seen in training: its reference is
# "Rina tidak akan mengunjungi kakeknya nanti malam." (her grandfather → kakek-nya, tonight → nanti malam).
DEFAULT_SENTENCE = "Rina will not visit her grandfather tonight."


def main(argv: list[str] | None = None) -> int:
    """Draw the README's figures into --out: positional_encoding.png always, and
    cross_attention.png (--name) when a --checkpoint is given."""
    parser = argparse.ArgumentParser(prog="python -m fromscratch.transformer.figures",
                                     description="Draw the Transformer README's figures.")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "figures"),
                        help="directory to write into (default: the package's figures/)")
    parser.add_argument("--checkpoint", metavar="RUN",
                        help="a translate run directory; without it only the positional encoding is drawn")
    parser.add_argument("--sentence", default=DEFAULT_SENTENCE, help="English source to translate")
    parser.add_argument("--layer", type=int, default=-1, help="decoder layer (default: -1, the last)")
    parser.add_argument("--head", type=int, default=None, help="one head (default: the mean over heads)")
    parser.add_argument("--beam", type=int, default=1, help="beam size of the translation (default: 1, greedy)")
    parser.add_argument("--name", default="cross_attention.png", help="file name of the attention figure")
    args = parser.parse_args(argv)
    try:
        out = Path(args.out)
        print(plot_positional_encoding(out / "positional_encoding.png"))
        if args.checkpoint:
            from fromscratch.transformer.translation import load_translator

            model, tokenizer = load_translator(args.checkpoint, device="cpu")
            path = plot_cross_attention(model, tokenizer, args.sentence, out / args.name, layer=args.layer,
                                        head=args.head, beam_size=args.beam)
            print(path)
    except UserError as error:
        print(f"figures: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
