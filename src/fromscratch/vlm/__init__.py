"""A vision–language model from scratch: the Vision Transformer, CLIP, and a CoCa-style model that
captions images and answers questions about them; data (easy-VQA, VQA-RAD, our own scenes, COCO
captions, VQAv2) and metrics.

    from fromscratch.vlm import VLM
    model = VLM.from_pretrained("runs/scenes")                 # a `fromscratch vlm train` run
    print(model.caption(images), model.answer(images, ["what color is the circle?"] * len(images)))

    from fromscratch.vlm import CLIP, ViT
    clip = CLIP.from_pretrained("clip-vit-base-patch32/")      # a Hugging Face CLIPModel directory
    logits_per_image = clip(pixel_values, input_ids, attention_mask)

    from fromscratch.vlm import train
    train("easy-vqa", "runs/easy-vqa")                         # what `fromscratch vlm train` runs
"""

from fromscratch.vlm.clip import CLIP, CLIPConfig, TextTransformer, contrastive_loss, zero_shot_classify
from fromscratch.vlm.config import VLMConfig
from fromscratch.vlm.fast import accelerate
from fromscratch.vlm.metrics import accuracy_report, bleu, cider_d, recall_at_k, vqa_accuracy
from fromscratch.vlm.model import VLM, AttentionalPooler, coca_loss
from fromscratch.vlm.tokenizer import WordTokenizer
from fromscratch.vlm.training import train, train_demo
from fromscratch.vlm.vit import ViT, ViTConfig, patchify

__all__ = [
    "ViT", "ViTConfig", "patchify", "CLIP", "CLIPConfig", "TextTransformer", "contrastive_loss", "zero_shot_classify",
    "VLM", "VLMConfig", "AttentionalPooler", "coca_loss", "WordTokenizer", "accelerate", "train", "train_demo",
    "accuracy_report", "vqa_accuracy", "bleu", "cider_d", "recall_at_k",
]
