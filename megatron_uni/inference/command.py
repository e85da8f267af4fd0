"""``megatron-uni generate`` / ``tools/generate.py``: generate from an HF folder or a checkpoint.

    megatron-uni generate MODEL text       --prompt "Write a haiku" --length 128
    megatron-uni generate MODEL image      --prompt "a red circle" --size 512x512 --cfg-scale 4
    megatron-uni generate MODEL edit       --source src.json --instruction "make it blue" --text-scale 4
    megatron-uni generate MODEL understand --image img.json --question "What is shown?" --length 64
    megatron-uni generate MODEL interleaved --prompt "A story in three pictures" --max-images 3

MODEL is an HF LLaDA2 folder (config.json + safetensors; run by the plain-PyTorch reference
model) or a megatron checkpoint root / iter_* directory (run by our megatron model in one CPU
process). Both use the prefix KV cache unless --no-cache. Images given to edit / understand are
one line (or file) of the decoder hand-off format of tools/export_image_tokens.py: {"h": H,
"w": W, "token_ids": [0-based codes]}. Text goes to stdout; --output appends the sampler record
(JSON Lines: id, task, prompt, tokens, text, stats), which tools/export_image_tokens.py reads;
--images appends the image grids in the decoder hand-off format.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import List, Optional

from megatron_uni.inference.generate import GenerationError


def _grid(text: str):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, got {text!r}") from None
    return h, w


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-uni generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="HF folder (config.json) or megatron checkpoint root / iter_* directory")
    parser.add_argument("--tokenizer", help="tokenizer directory (tokenizer.json); default: the HF folder itself")
    parser.add_argument("--num-image-codes", type=int, default=None,
                        help="VQ codebook size (default: from the model config)")
    parser.add_argument("--block-size", type=int, default=32, help="block length (default %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help="refinement forwards per block at most (default: 32 text, 8 images)")
    parser.add_argument("--threshold", type=float, default=0.95, help="accept above this confidence (%(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when temperature > 0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute the prefix every step (no KV cache)")
    parser.add_argument("--output", help="append the sampler record here (JSON Lines)")
    parser.add_argument("--images", help="append generated image grids here (decoder hand-off JSON Lines)")
    parser.add_argument("--id", default="sample-0", help="id written with the records")
    tasks = parser.add_subparsers(dest="task", required=True)
    text = tasks.add_parser("text", help="text continuation / chat answer")
    text.add_argument("--prompt", required=True)
    text.add_argument("--system", default=None, help="system prompt")
    text.add_argument("--no-chat", action="store_true", help="raw prompt, no chat template")
    text.add_argument("--allow-special", action="store_true", help="special-token strings in the prompt are specials")
    text.add_argument("--length", type=int, default=256, help="positions to generate (default %(default)s)")
    image = tasks.add_parser("image", help="text-to-image: an image-code grid")
    image.add_argument("--prompt", required=True)
    size = image.add_mutually_exclusive_group(required=True)
    size.add_argument("--grid", type=_grid, help="code grid HxW")
    size.add_argument("--size", type=_grid, help="output pixels HxW (multiples of 32: 16 px per code, 2x decoder)")
    image.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale (1 = no guidance)")
    image.add_argument("--cfg-rescale", type=float, default=0.0, help="std rescale of the guided logits (0..1)")
    edit = tasks.add_parser("edit", help="image editing: source image + instruction -> image of the same grid")
    edit.add_argument("--source", required=True, help="source image: JSON {h, w, token_ids}")
    edit.add_argument("--instruction", required=True)
    edit.add_argument("--text-scale", type=float, default=4.0, help="text guidance (default %(default)s)")
    edit.add_argument("--image-scale", type=float, default=0.0, help="image guidance (default %(default)s)")
    edit.add_argument("--cfg-rescale", type=float, default=0.0)
    understand = tasks.add_parser("understand", help="image(s) + question -> text")
    understand.add_argument("--image", action="append", required=True, help="JSON {h, w, token_ids}; repeatable")
    understand.add_argument("--question", default="")
    understand.add_argument("--length", type=int, default=256)
    interleaved = tasks.add_parser("interleaved", help="text, and an image wherever the model writes a header")
    interleaved.add_argument("--prompt", required=True)
    interleaved.add_argument("--length", type=int, default=256, help="text positions per text phase")
    interleaved.add_argument("--max-images", type=int, default=4)
    interleaved.add_argument("--image-steps", type=int, default=8, help="steps per block of image phases")
    return parser


def read_image(path: str):
    """(H, W, codes) from a decoder hand-off record (first line of a JSON / JSON Lines file)."""
    with open(path) as f:
        line = f.readline()
    try:
        record = json.loads(line)
        grid_h, grid_w, codes = int(record["h"]), int(record["w"]), [int(c) for c in record["token_ids"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise GenerationError(f"{path}: expected a JSON object with h, w, token_ids ({err})") from None
    if len(codes) != grid_h * grid_w:
        raise GenerationError(f"{path}: {len(codes)} token_ids for a {grid_h}x{grid_w} grid")
    return grid_h, grid_w, codes


def load_runner(args):
    """(runner, vocabulary) for ``args.model``."""
    from megatron_uni.convert.hf_io import CONFIG_FILE, read_json
    from megatron_uni.inference.loading import hf_runner, is_megatron_checkpoint
    from megatron_uni.tokens import Vocabulary

    if is_megatron_checkpoint(args.model):
        from megatron_uni.inference.megatron_runner import megatron_runner_from_checkpoint, model_config_from_checkpoint

        if not args.tokenizer:
            raise GenerationError(f"{args.model} is a megatron checkpoint: pass --tokenizer DIR")
        model_cfg = model_config_from_checkpoint(args.model)
        vocabulary = Vocabulary.from_tokenizer_dir(args.tokenizer, text_size=model_cfg.text_vocab,
                                                   num_image_codes=args.num_image_codes or model_cfg.num_image_codes)
        return megatron_runner_from_checkpoint(args.model, model_cfg, cached=not args.no_cache), vocabulary
    config_file = os.path.join(args.model, CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise GenerationError(f"{args.model}: neither an HF folder ({CONFIG_FILE}) nor a megatron checkpoint")
    config = read_json(config_file)
    text_size = int(config.get("image_token_offset") or config["vocab_size"])
    codes = args.num_image_codes or (int(config["vocab_size"]) - text_size) or 1
    vocabulary = Vocabulary.from_tokenizer_dir(args.tokenizer or args.model, text_size=text_size, num_image_codes=codes)
    return hf_runner(args.model, cached=not args.no_cache), vocabulary


def build_request(args, vocabulary):
    from megatron_uni.inference import prompts

    if args.task == "text":
        return prompts.text_request(vocabulary, args.prompt, args.length, args.system, chat=not args.no_chat,
                                    allow_special=args.allow_special)
    if args.task == "image":
        grid_h, grid_w = args.grid if args.grid else prompts.grid_from_pixels(*args.size)
        return prompts.text_to_image_request(vocabulary, args.prompt, grid_h, grid_w, args.cfg_scale, args.cfg_rescale)
    if args.task == "edit":
        return prompts.editing_request(vocabulary, read_image(args.source), args.instruction, args.text_scale,
                                       args.image_scale, args.cfg_rescale)
    return prompts.understanding_request(vocabulary, [read_image(p) for p in args.image], args.question, args.length)


def render_text(vocabulary, ids: List[int]) -> str:
    """Text of generated ids; image codes outside a well-formed image block (a text answer of
    an untrained model may hold some) are shown as ``<code N>`` instead of failing."""
    try:
        return vocabulary.decode(ids)
    except ValueError:
        return "".join(vocabulary.decode([t]) if t < vocabulary.text_size else
                       f"<code {t - vocabulary.image_offset}>" for t in ids)


def _append_jsonl(path: str, records: List[dict]) -> None:
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _interleaved(args, runner, vocabulary, settings):
    from megatron_uni.data.formats import SYSTEM_INTERLEAVED
    from megatron_uni.inference import prompts
    from megatron_uni.inference.interleaved import generate_interleaved

    prompt = prompts.chat_prompt(vocabulary, SYSTEM_INTERLEAVED, prompts.encode_text(vocabulary, args.prompt))
    image_settings = dataclasses.replace(settings, steps=args.image_steps)
    return generate_interleaved(runner, vocabulary, prompt, args.length, settings, image_settings, args.max_images)


def run(args) -> int:
    from megatron_uni.convert.image_tokens import images_of_record
    from megatron_uni.inference.generate import generate
    from megatron_uni.inference.sampling import SamplerSettings

    runner, vocabulary = load_runner(args)
    image_task = args.task in ("image", "edit")
    steps = args.steps or (8 if image_task else 32)
    settings = SamplerSettings(args.block_size, steps, args.threshold, args.temperature, args.top_p, args.seed)
    if args.task == "interleaved":
        out = _interleaved(args, runner, vocabulary, settings)
        tokens = out.tokens
    else:
        request = build_request(args, vocabulary)
        out = generate(runner, vocabulary, request, settings)
        # image outputs carry their header so the record holds a whole <|image|> ... <|/image|> block
        tokens = (request.prompts[0][-4:] + out.tokens) if image_task else out.tokens
    text = render_text(vocabulary, [t for t in tokens if t != vocabulary.eos_id])
    stats = {"generated": len(out.tokens), "refinement_forwards": out.refinement_forwards,
             "model_forwards": runner.forwards, "finished": out.finished}
    if args.task != "interleaved":
        stats.update(tokens_per_forward=round(out.tokens_per_forward, 3), seconds=round(out.seconds, 3))
    record = {"id": args.id, "task": args.task, "prompt": getattr(args, "prompt", None) or
              getattr(args, "instruction", None) or getattr(args, "question", None),
              "tokens": tokens, "text": text, "stats": stats}
    print(text)
    print(json.dumps(stats), file=sys.stderr)
    if args.output:
        _append_jsonl(args.output, [record])
    if args.images and (image_task or (args.task == "interleaved" and out.images)):
        _append_jsonl(args.images, images_of_record(record, vocabulary, args.id))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_uni.convert.hf_io import ConversionError
    from megatron_uni.tokens import VocabularyError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (GenerationError, ConversionError, VocabularyError, FileNotFoundError) as err:
        print(f"generate: error: {err}", file=sys.stderr)
        return 2
