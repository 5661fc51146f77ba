#!/usr/bin/env python
"""Build the tokenizer shipped in `nanovlm_cli/assets/tiny_tokenizer/` (`language.tokenizer = "builtin:tiny"`).

A byte-level BPE of exactly 512 tokens (the tiny preset's vocab_size): ids 0-2 are the specials `<|endoftext|>`
(pad), `<|im_start|>`, `<|im_end|>` (EOS, ChatML), then the 256 byte symbols, so any text (ASCII or UTF-8)
round-trips, then 253 merges learned from a generated corpus that is mostly the shapes dataset's own text
(questions, options, answers, chat roles) plus plain English. That makes the shapes vocabulary whole-word tokens
("circle", " triangle", "Answer"), which helps a from-scratch 1M-parameter model learn. The corpus and the trainer
are deterministic, so re-running gives the same files:

    python scripts/build_tiny_tokenizer.py [OUT_DIR]
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from nanovlm_cli.data import shapes
from nanovlm_cli.data.tokenizer import TINY_TOKENIZER_DIR, chat_template_jinja

logger = logging.getLogger(__name__)

VOCAB_SIZE = 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A picture of a cat sitting on a table next to a cup of coffee.
What is in this image? Describe the image in one sentence. There is a man riding a bike down the street.
Two people are walking on the beach at sunset. The sky is blue and the grass is green. How many people are
in the photo? Is there a dog in the picture? Yes, there is. No, there is not. The text says hello world.
You are a helpful assistant. Please answer the question about the image. The answer is yes. The answer is no.
This is a photo of a kitchen with a white fridge, a black oven and a wooden floor. It was a sunny day.
"""


def corpus(n_items: int = 4000) -> Iterator[str]:
    """Text the merges are learned from: chat roles, shapes questions / options / answers, some English."""
    for _ in range(200):
        yield from ("system", "user", "assistant")
    for i in range(n_items):
        rng = shapes.item_rng(i, seed=1234, split="tokenizer")
        item = shapes.make_item(rng, "train", multiple_choice=i % 2 == 0)
        yield shapes.mmstar_prompt(item.question) if item.letter else item.question
        yield item.letter or item.answer
    for word in (*shapes.COLOURS, *shapes.SHAPES, *shapes.POSITIONS, *shapes.SIZES, *shapes.COUNT_WORDS):
        yield from (word, f" {word}", f"{word}s") * 20
    for _ in range(30):
        yield from _ENGLISH.splitlines()
    yield "0 1 2 3 4 5 6 7 8 9 10 100 2024 A B C D E"


def build(out_dir: Path) -> Path:
    """Train and write tokenizer.json + tokenizer_config.json into `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        model_max_length=1024, chat_template=chat_template_jinja("chatml"),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    # Name the class transformers 4.x and 5.x both resolve (5.x writes its own "TokenizersBackend").
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    logger.info("wrote a %d-token tokenizer to %s", VOCAB_SIZE, out_dir)
    return out_dir


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else TINY_TOKENIZER_DIR)
