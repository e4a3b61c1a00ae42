"""`fromscratch vlm train | eval | caption | ask`: the command line over training.py and evaluation.py.

    fromscratch vlm train   --data NAME_OR_PATH --out DIR [--preset NAME] [--max-steps N] [--seed S] [--resume]
    fromscratch vlm eval    --checkpoint DIR --data NAME_OR_PATH [--test FILE]   (last line: accuracy X | CIDEr X)
    fromscratch vlm caption --checkpoint DIR IMAGE [IMAGE ...] [--beam N] [--attention-map PNG]
    fromscratch vlm ask     --checkpoint DIR IMAGE QUESTION

NAME is easy-vqa, vqa-rad or scenes; PATH a folder in VQA-RAD's or COCO's layout (sources.py).
"""

from __future__ import annotations

import argparse
import json
import sys

from fromscratch.engine import add_train_arguments, engine_options
from fromscratch.errors import UserError
from fromscratch.inputs import checked_output
from fromscratch.vlm import sources
from fromscratch.vlm.config import VLMConfig
from fromscratch.vlm.training import DEFAULTS, train


def register(subparsers) -> None:
    vlm = subparsers.add_parser("vlm", help="the vision-language model (CoCa, Yu et al. 2022): captions and VQA",
                                description="Train, evaluate and run the vision-language model.")
    verbs = vlm.add_subparsers(dest="vlm_command", required=True, metavar="VERB")

    train_p = verbs.add_parser(
        "train", help="train on images with questions and/or captions",
        description="Train a VLM (a ViT image encoder and a text decoder with cross-attention, trained with a "
                    "contrastive and a captioning loss) on NAME (easy-vqa, vqa-rad, scenes) or a folder. "
                    "--batch-size counts images; each comes with --texts-per-image texts.")
    train_p.add_argument("--data", required=True, metavar="NAME_OR_PATH", help="easy-vqa, vqa-rad, scenes, or a folder")
    train_p.add_argument("--preset", default=None, choices=list(VLMConfig.PRESETS),
                         help="model size (default: the dataset's)")
    train_p.add_argument("--texts-per-image", type=int, default=None, help="captions + questions per image in a batch")
    train_p.add_argument("--scenes", type=int, default=None, metavar="N",
                         help="scenes: how many to generate for training (default: 10000)")
    train_p.add_argument("--blind", action="store_true",
                         help="the question-only baseline: every image black, in training and evaluation")
    add_train_arguments(train_p, DEFAULTS)
    for action in train_p._actions:  # the dataset decides these defaults unless given
        if action.dest in ("max_steps", "batch_size", "lr"):
            action.default = None
            action.help = f"default: the dataset's (training.DATA_DEFAULTS), else {getattr(DEFAULTS, action.dest)}"
    train_p.set_defaults(func=cmd_train)

    checkpoint_help = "a `vlm train` run directory (its best checkpoint) or one checkpoint in it"
    eval_p = verbs.add_parser(
        "eval", help="VQA accuracy, caption BLEU-4 / CIDEr-D, retrieval recall@k",
        description="Evaluate on the test split of NAME_OR_PATH (or --test FILE). The last line is "
                    "'accuracy X' (percent) for question data, 'CIDEr X' (CIDEr-D ×100, as papers report it) "
                    "for caption data (the scenes have both: their last line is CIDEr).")
    eval_p.add_argument("--checkpoint", required=True, metavar="DIR", help=checkpoint_help)
    eval_p.add_argument("--data", required=True, metavar="NAME_OR_PATH")
    eval_p.add_argument("--test", metavar="FILE", help="a test file in the data's format (VQA-RAD's, COCO's)")
    eval_p.add_argument("--beam", type=int, default=1, help="beam size for captions and answers (default: 1, greedy)")
    eval_p.add_argument("--limit", type=int, default=None, metavar="N",
                        help="only the first N images of the test split")
    eval_p.add_argument("--output", metavar="JSON", help="also write every metric here")
    eval_p.add_argument("--device", default="auto")
    eval_p.set_defaults(func=cmd_eval)

    caption_p = verbs.add_parser("caption", help="caption image files")
    caption_p.add_argument("--checkpoint", required=True, metavar="DIR", help=checkpoint_help)
    caption_p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    caption_p.add_argument("--beam", type=int, default=1, help="beam size (default: 1, greedy)")
    caption_p.add_argument("--attention-map", metavar="PNG", help="draw where the decoder looked for each word")
    caption_p.add_argument("--device", default="auto")
    caption_p.set_defaults(func=cmd_caption)

    ask_p = verbs.add_parser("ask", help="answer a question about an image file")
    ask_p.add_argument("--checkpoint", required=True, metavar="DIR", help=checkpoint_help)
    ask_p.add_argument("image", metavar="IMAGE")
    ask_p.add_argument("question", metavar="QUESTION")
    ask_p.add_argument("--beam", type=int, default=1)
    ask_p.add_argument("--device", default="auto")
    ask_p.set_defaults(func=cmd_ask)


def cmd_train(args: argparse.Namespace) -> None:
    result = train(args.data, args.out, preset=args.preset, texts_per_image=args.texts_per_image, scenes=args.scenes,
                   blind=args.blind, command=["fromscratch", *sys.argv[1:]], **engine_options(args))
    print(json.dumps({"step": result["step"], **result["eval"], "best": result["best"], "run_dir": result["run_dir"]}))


def _check_beam(beam: int) -> None:
    if beam < 1:
        raise UserError(f"--beam must be at least 1, got {beam}")


def _load(checkpoint: str, device: str):
    from fromscratch.vlm.model import VLM

    return VLM.from_pretrained(checkpoint, device)


def _read_images(model, paths: list[str]):
    from fromscratch.vlm.data import load_images

    return load_images(paths, model.config.image_size, model.config.n_channels)


def _percent(x: float) -> str:
    return f"{100 * x:.2f}"


def cmd_eval(args: argparse.Namespace) -> None:
    from fromscratch.vlm import evaluation
    from fromscratch.vlm.scenes import load_mnist, zero_shot_digits

    _check_beam(args.beam)
    if args.limit is not None and args.limit < 2:
        raise UserError(f"--limit must be at least 2, got {args.limit}")
    what = sources.kind(args.data)
    output = checked_output(args.output, "--output") if args.output else None
    model = _load(args.checkpoint, args.device)
    c, settings = model.config, model.settings
    scene_settings = settings.get("scenes") or sources.SCENE_DEFAULTS
    split = sources.load_part(args.data, "test", c.image_size, c.n_channels, test_file=args.test, scenes=scene_settings)
    if args.limit is not None:
        split = split.first(args.limit)
    blind = bool(settings.get("blind"))
    print(split.summary() + (" (question-only model: every image black)" if blind else ""))
    report: dict = {"data": args.data, "split": split.name, "blind": blind}
    if split.questions:
        vqa = evaluation.evaluate_vqa(model, split, blind=blind, beam_size=args.beam)
        for field in ("question_type", "answer_type", "unseen"):
            groups = vqa.get(f"by_{field}")
            if groups:
                name = {"unseen": "combination unseen in training"}.get(field, field.replace("_", " "))
                print(f"accuracy by {name}: " + ", ".join(
                    f"{value} {_percent(g['accuracy'])} (n={g['n']})" for value, g in groups.items()))
        if "shuffled_accuracy" in vqa:
            gap = vqa["accuracy"] - vqa["shuffled_accuracy"]
            print(f"accuracy with the images shuffled among the questions {_percent(vqa['shuffled_accuracy'])} "
                  f"(the image's share: {_percent(gap)} points)")
        report["vqa"] = {k: v for k, v in vqa.items() if k != "predictions"}
    if split.captions:
        captions = evaluation.evaluate_captions(model, split, beam_size=args.beam)
        line = f"captions: BLEU-4 {_percent(captions['bleu4'])}, CIDEr-D {100 * captions['cider']:.1f}"
        if "cider_unseen" in captions:
            line += (f" (images with only seen combinations {100 * captions['cider_seen']:.1f}, "
                     f"with an unseen one {100 * captions['cider_unseen']:.1f})")
        print(line)
        retrieval = evaluation.evaluate_retrieval(model, split)
        print("retrieval: " + ", ".join(f"{k} {_percent(v)}" for k, v in retrieval.items()))
        report["captions"] = {k: v for k, v in captions.items() if k != "hypotheses"}
        report["retrieval"] = retrieval
        if what == "scenes":
            zero_shot = evaluation.evaluate_zero_shot_digits(model, zero_shot_digits(load_mnist()))
            print(f"zero-shot digits by text prompts alone: {_percent(zero_shot['accuracy'])} "
                  f"(n={zero_shot['n']}, chance 10.00)")
            report["zero_shot_digits"] = zero_shot
    if output:
        output.write_text(json.dumps(report, indent=2) + "\n")
    if split.captions:
        print(f"CIDEr {100 * report['captions']['cider']:.2f}")
    else:
        print(f"accuracy {_percent(report['vqa']['accuracy'])}")


def cmd_caption(args: argparse.Namespace) -> None:
    _check_beam(args.beam)
    attention_map = checked_output(args.attention_map, "--attention-map", ".png") if args.attention_map else None
    model = _load(args.checkpoint, args.device)
    images = _read_images(model, args.images)
    captions = model.caption(images, args.beam, model.settings.get("max_caption_tokens", 32))
    for path, caption in zip(args.images, captions):
        print(f"{path}\t{caption}" if len(args.images) > 1 else caption)
    if attention_map:
        from fromscratch.vlm.figures import plot_attention_maps

        print(f"attention map: {plot_attention_maps(model, images, attention_map, args.beam)}", file=sys.stderr)


def cmd_ask(args: argparse.Namespace) -> None:
    from fromscratch.inputs import checked_text

    _check_beam(args.beam)
    question = checked_text(args.question, "QUESTION").strip()
    if not question:
        raise UserError("QUESTION is empty")
    model = _load(args.checkpoint, args.device)
    images = _read_images(model, [args.image])
    print(model.answer(images, [question], model.settings.get("max_answer_tokens", 8), args.beam)[0])
