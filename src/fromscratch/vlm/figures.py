"""Figures for the VLM README: an image as a sequence of patches, where the decoder looks for each
word it writes, and the similarity matrix of the joint space.

    python -m fromscratch.vlm.figures --out DIR                    # the patch grid (no model needed)
    python -m fromscratch.vlm.figures --out DIR --checkpoint RUN   # + attention maps and similarities

RUN is a `fromscratch vlm train` run on the scenes (e.g. `runs/demo/vlm` after `fromscratch
demo`); the figures use the scenes' test split. Without --out the figures go to this package's
figures/, where the README finds them. matplotlib is optional (`pip install fromscratch[plot]`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from fromscratch.errors import UserError
from fromscratch.engine.plot import pyplot, save_figure
from fromscratch.vlm.decoding import cross_attention_maps


def _rgb(image: torch.Tensor) -> np.ndarray:
    """uint8 (C, H, W) → (H, W, 3) for imshow."""
    array = image.cpu().numpy().transpose(1, 2, 0)
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array


def plot_patch_grid(image: torch.Tensor, patch_size: int, path) -> Path:
    """The image cut into its P×P patches, numbered in the order the ViT reads them (row-major),
    beside the sequence of flattened patches it becomes (one row of C·P·P values each)."""
    from fromscratch.vlm.vit import patchify

    plt = pyplot()
    c, h, w = image.shape
    rows, cols = h // patch_size, w // patch_size
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1, 1.5]})
    left.imshow(_rgb(image), interpolation="nearest")
    for k in range(1, rows):
        left.axhline(k * patch_size - 0.5, color="white", linewidth=0.8)
    for k in range(1, cols):
        left.axvline(k * patch_size - 0.5, color="white", linewidth=0.8)
    for r in range(rows):
        for q in range(cols):
            left.text(q * patch_size + 1, r * patch_size + 3, str(r * cols + q), color="yellow", fontsize=6)
    left.set_title(f"{h}×{w} image, {rows}×{cols} patches of {patch_size}×{patch_size}", fontsize=10)
    left.axis("off")
    patches = patchify(image[None].float(), patch_size)[0]  # (N, C·P·P)
    right.imshow(patches.numpy(), aspect="auto", cmap="gray", interpolation="nearest")
    right.set_xlabel(f"C·P·P = {c}·{patch_size}·{patch_size} = {patches.size(1)} values (channel, row, column)")
    right.set_ylabel("patch index: the sequence position")
    right.set_title("the sequence x_p the linear map E embeds (eq. 1)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_attention_maps(model, images: torch.Tensor, path, beam_size: int = 1, max_words: int = 12) -> Path:
    """Caption uint8 images (B, C, H, W) and draw, for every generated word, the decoder's
    cross-attention over the patches (mean over the heads of every multimodal layer), upsampled
    and laid over the image: one row per image."""
    plt = pyplot()
    from fromscratch.vlm import decoding

    c = model.config
    pixels = model.pixels(images)
    ids = decoding.caption_ids(model, pixels, beam_size, model.settings.get("max_caption_tokens", 32))
    prompt = torch.full((len(images), 1), c.bos_id, dtype=torch.long, device=pixels.device)
    maps = cross_attention_maps(model, pixels, prompt, ids).cpu()  # (B, L, gh, gw)
    words = [[model.tokenizer.id_to_token(i) for i in row if i != c.pad_id][:max_words] for row in ids.tolist()]
    n_cols = 1 + max(len(w) for w in words)
    fig, axes = plt.subplots(len(images), n_cols, figsize=(1.6 * n_cols, 1.8 * len(images)), squeeze=False)
    for b, row in enumerate(words):
        axes[b, 0].imshow(_rgb(images[b]))
        axes[b, 0].set_title("image", fontsize=8)
        for j in range(1, n_cols):
            ax = axes[b, j]
            ax.axis("off")
            if j > len(row):
                continue
            heat = torch.nn.functional.interpolate(maps[b, j - 1][None, None], size=images.shape[2:], mode="nearest")
            ax.imshow(_rgb(images[b]))
            ax.imshow(heat[0, 0].numpy(), cmap="inferno", alpha=0.6)
            ax.set_title(row[j - 1], fontsize=8)
        axes[b, 0].axis("off")
    fig.suptitle("Where the decoder looks as it writes each word (cross-attention over the patches)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_similarity_matrix(model, images: torch.Tensor, captions: list[str], path) -> Path:
    """cos(caption i, image j) in the joint space, for images and their own captions (the
    diagonal holds the matching pairs): the images along the top, the captions down the side."""
    plt = pyplot()
    similarity = (model.embed_texts(captions) @ model.embed_images(images).t()).cpu().numpy()  # (captions, images)
    n = len(images)
    fig = plt.figure(figsize=(4.5 + 0.75 * n, 1.2 + 0.75 * (n + 1)))
    grid = fig.add_gridspec(2, n + 1, height_ratios=[1, n], width_ratios=[1] * n + [0.25], hspace=0.05, wspace=0.05)
    for j in range(n):
        ax = fig.add_subplot(grid[0, j])
        ax.imshow(_rgb(images[j]))
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :n])
    shown = ax.imshow(similarity, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(captions)), captions, fontsize=7)
    ax.set_xticks(range(n), [f"image {j}" for j in range(n)], fontsize=7)
    fig.colorbar(shown, cax=fig.add_subplot(grid[1, n]))
    fig.suptitle("cosine similarity of captions (rows) and images (columns) in the joint space", fontsize=10)
    fig.subplots_adjust(left=0.42, right=0.95, top=0.9, bottom=0.08)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fromscratch.vlm.figures",
                                     description="Draw the VLM README's figures.")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "figures"),
                        help="directory to write into (default: the package's figures/)")
    parser.add_argument("--checkpoint", metavar="RUN", help="a `vlm train` run on the scenes")
    parser.add_argument("--n-images", type=int, default=4, help="test scenes in the attention and similarity figures")
    args = parser.parse_args(argv)
    try:
        from fromscratch.vlm import sources

        out = Path(args.out)
        size = 64
        model = None
        if args.checkpoint:
            from fromscratch.vlm.model import VLM

            model = VLM.from_pretrained(args.checkpoint)
            size = model.config.image_size
        scenes = sources.load_part("scenes", "test", size, 3, scenes={**sources.SCENE_DEFAULTS, "n_test": 50})
        patch_size = 8 if model is None else model.config.patch_size
        print(plot_patch_grid(scenes.images[0], patch_size, out / "patch_grid.png"))
        if model is not None:
            images = scenes.images[: args.n_images]
            print(plot_attention_maps(model, images, out / "attention_maps.png"))
            captions = [e.captions[0] for e in scenes.captions[: 2 * args.n_images]]
            print(plot_similarity_matrix(model, scenes.images[: 2 * args.n_images], captions, out / "similarity.png"))
    except UserError as error:
        print(f"figures: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
