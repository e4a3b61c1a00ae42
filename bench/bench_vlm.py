"""Benchmark of fromscratch's vision–language models on this machine's CPU, against Hugging Face's.

1. ViT-Tiny training (32×32 images, 4×4 patches, batch 64): forward + a linear classifier on the
   class token + cross-entropy + backward + AdamW step, ours (`fromscratch.vlm.accelerate(ViT)`,
   the class token's state by `ViT.class_state`, whose last layer runs for that token only)
   against `transformers.ViTModel` holding the very same weights (`last_hidden_state[:, 0]`).
   Ratio = ours / theirs, images/s.
2. CLIP encoding (ViT-B/32 shapes, random weights): the image tower on a batch of 224×224 images
   and the text tower on a batch of 77-token texts, `CLIP.embed_images` + `embed_texts` against
   `CLIPModel.get_image_features` + `get_text_features`, same weights, no gradients. Then again
   with texts of 8 to 24 tokens (a prompt, a caption) padded with zeros to 77, as OpenAI's
   `clip.tokenize` pads them: ours stop each text's tower after the batch's last end of text.
3. Captioning: greedy decoding of exactly 32 words (EOS ignored) by the `small` VLM, with the KV
   cache (the image's keys and values projected once) against recomputing the whole prefix at
   every step. Ratio = cached / uncached.

Float32, 2 threads. Measurements alternate between the contenders round after round and report
the median round, so that a noisy neighbour slows both alike. Run it on a quiet machine:

    python bench/bench_vlm.py            # the real run, a few minutes
    python bench/bench_vlm.py --quick    # a smoke run, seconds

Writes bench/results/vlm.json.
"""

import argparse
import os
import platform
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from harness import alternate, write_results

from fromscratch.devices import describe_device
from fromscratch.vlm import CLIP, VLM, ViT, VLMConfig, accelerate
from fromscratch.vlm.decoding import generate, image_memory

RESULTS = Path(__file__).resolve().parent / "results" / "vlm.json"


def median_seconds(contenders: dict, rounds: int, warmup: int = 1) -> dict:
    """Median seconds a call of each contender, over `rounds` interleaved rounds (`harness.alternate`)."""
    return {name: s["median"] for name, s in alternate(contenders, rounds, warmup).items()}


def bench_vit_training(hf_config: dict, batch_size: int, rounds: int) -> dict:
    torch.manual_seed(0)
    theirs = transformers.ViTModel(transformers.ViTConfig(**hf_config), add_pooling_layer=False)
    with tempfile.TemporaryDirectory() as directory:
        theirs.save_pretrained(directory)
        ours = accelerate(ViT.from_pretrained(directory))
    ours.train(), theirs.train()
    d, n_classes = hf_config["hidden_size"], 10
    heads = {name: torch.nn.Linear(d, n_classes) for name in ("ours", "theirs")}
    heads["theirs"].load_state_dict(heads["ours"].state_dict())
    size = hf_config["image_size"]
    images = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, n_classes, (batch_size,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(images) - theirs(images).last_hidden_state).abs().max() < 1e-4  # the same model, twice
    optimizers = {name: torch.optim.AdamW([*model.parameters(), *heads[name].parameters()], lr=1e-4)
                  for name, model in (("ours", ours), ("theirs", theirs))}

    def step(name):
        features = ours.class_state(images) if name == "ours" else theirs(images).last_hidden_state[:, 0]
        loss = F.cross_entropy(heads[name](features), labels)
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    seconds = median_seconds({"ours": lambda: step("ours"), "transformers": lambda: step("theirs")}, rounds)
    return {
        "config": hf_config, "batch_size": batch_size, "parameters": sum(p.numel() for p in ours.parameters()),
        "seconds_per_step": seconds, "images_per_second": {k: batch_size / s for k, s in seconds.items()},
        "ratio_ours_over_transformers": seconds["transformers"] / seconds["ours"], "target": 1.2,
    }


def bench_clip_encoding(text_config: dict, vision_config: dict, n_images: int, n_texts: int, rounds: int,
                        text_lengths: tuple[int, int] | None = None) -> dict:
    """text_lengths None: every text fills all the positions (77 tokens). (lo, hi): each text
    has from lo to hi tokens (start and end of text included, drawn uniformly) and is padded with
    zeros to all the positions, as OpenAI's `clip.tokenize` pads."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=512)
    theirs = transformers.CLIPModel(config).eval()
    with tempfile.TemporaryDirectory() as directory:
        theirs.save_pretrained(directory)
        ours = accelerate(CLIP.from_pretrained(directory))
    size, length, vocab = vision_config["image_size"], text_config["max_position_embeddings"], text_config["vocab_size"]
    images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(1, vocab - 1, (n_texts, length), generator=torch.Generator().manual_seed(2))
    ids[:, -1] = text_config["eos_token_id"]
    if text_lengths is not None:
        lengths = torch.randint(text_lengths[0], text_lengths[1] + 1, (n_texts,),
                                generator=torch.Generator().manual_seed(3))
        ids[:, 0] = text_config["bos_token_id"]
        ids[torch.arange(n_texts), lengths - 1] = text_config["eos_token_id"]
        ids[torch.arange(length)[None, :] >= lengths[:, None]] = 0

    @torch.no_grad()
    def encode_ours():
        return ours.embed_images(images), ours.embed_texts(ids)

    @torch.no_grad()
    def encode_theirs():
        return theirs.get_image_features(pixel_values=images), theirs.get_text_features(input_ids=ids)

    with torch.no_grad():
        logits = theirs(input_ids=ids, pixel_values=images).logits_per_image
        assert (ours(images, ids) - logits).abs().max() < 1e-3  # the same model, twice
    seconds = median_seconds({"ours": encode_ours, "transformers": encode_theirs}, rounds)
    return {
        "text_config": text_config, "vision_config": vision_config, "n_images": n_images, "n_texts": n_texts,
        "text_lengths": "all positions" if text_lengths is None else text_lengths, "seconds": seconds,
        "pairs_per_second": {k: (n_images + n_texts) / 2 / s for k, s in seconds.items()},
        "ratio_ours_over_transformers": seconds["transformers"] / seconds["ours"], "target": 1.2,
    }


def bench_captioning(preset: str, batch_size: int, new_tokens: int, rounds: int) -> dict:
    torch.manual_seed(0)
    config = VLMConfig.from_preset(preset, vocab_size=200)
    model = VLM(config).eval()
    pixels = torch.randn(batch_size, config.n_channels, config.image_size, config.image_size)

    def decode(use_cache):
        memory = image_memory(model, pixels)
        prompt = torch.full((batch_size, 1), config.bos_id)
        out = generate(model, memory, prompt, new_tokens, use_cache=use_cache, stop_at_eos=False)
        assert out.shape == (batch_size, new_tokens)
        return out

    assert torch.equal(decode(True), decode(False))
    seconds = median_seconds({"cached": lambda: decode(True), "uncached": lambda: decode(False)}, rounds, warmup=0)
    return {
        "config": config.to_dict(), "batch_size": batch_size, "new_tokens": new_tokens, "seconds": seconds,
        "words_per_second": {k: batch_size * new_tokens / s for k, s in seconds.items()},
        "speedup_cached_over_uncached": seconds["uncached"] / seconds["cached"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    vit_tiny = dict(image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                    intermediate_size=768)
    clip_text = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    clip_vision = dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12)
    if args.quick:
        vit_tiny.update(hidden_size=48, num_hidden_layers=2, intermediate_size=96)
        clip_text.update(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=998, eos_token_id=999)
        clip_vision.update(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4)
        shapes = dict(vit_batch=8, clip_images=2, clip_texts=2, caption_batch=2, caption_tokens=6, rounds=1,
                      caption_preset="tiny", text_lengths=(3, 8))
    else:
        shapes = dict(vit_batch=64, clip_images=16, clip_texts=16, caption_batch=8, caption_tokens=32, rounds=5,
                      caption_preset="small", text_lengths=(8, 24))

    results = {
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "hardware": describe_device("cpu"), "quick": args.quick,
        # 1-minute load average: above ~0.5 another process competed for the cores
        "load_average_before": os.getloadavg()[0],
    }
    r = results["vit_tiny_training"] = bench_vit_training(vit_tiny, shapes["vit_batch"], shapes["rounds"])
    print(f"ViT training (d {vit_tiny['hidden_size']}, batch {r['batch_size']}): ours "
          f"{r['images_per_second']['ours']:.1f} images/s, ViTModel {r['images_per_second']['transformers']:.1f}, "
          f"ratio {r['ratio_ours_over_transformers']:.2f}x (target 1.2x)", flush=True)
    r = results["clip_encoding"] = bench_clip_encoding(clip_text, clip_vision, shapes["clip_images"],
                                                       shapes["clip_texts"], shapes["rounds"])
    print(f"CLIP encoding ({shapes['clip_images']} images + {shapes['clip_texts']} texts): "
          f"ours {r['seconds']['ours']:.3f} s, "
          f"CLIPModel {r['seconds']['transformers']:.3f} s, ratio {r['ratio_ours_over_transformers']:.2f}x "
          "(target 1.2x)", flush=True)
    r = results["clip_encoding_padded_texts"] = bench_clip_encoding(
        clip_text, clip_vision, shapes["clip_images"], shapes["clip_texts"], shapes["rounds"], shapes["text_lengths"])
    lo, hi = shapes["text_lengths"]
    print(f"CLIP encoding ({shapes['clip_images']} images + {shapes['clip_texts']} texts of {lo}-{hi} tokens "
          f"padded to {clip_text['max_position_embeddings']}): "
          f"ours {r['seconds']['ours']:.3f} s, CLIPModel {r['seconds']['transformers']:.3f} s, "
          f"ratio {r['ratio_ours_over_transformers']:.2f}x (target 1.2x)", flush=True)
    r = results["captioning"] = bench_captioning(shapes["caption_preset"], shapes["caption_batch"],
                                                 shapes["caption_tokens"], shapes["rounds"])
    print(f"captioning ({r['batch_size']} images, {r['new_tokens']} words): cached {r['seconds']['cached']:.3f} s, "
          f"uncached {r['seconds']['uncached']:.3f} s, speed-up {r['speedup_cached_over_uncached']:.1f}x", flush=True)
    results["load_average_after"] = os.getloadavg()[0]
    write_results(results, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
