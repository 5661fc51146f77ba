"""Where issue 18's position questions fail: in the image tokens, or in the decoder reading them?

For a trained checkpoint (e.g. `nanovlm train --preset tiny`'s `final/`) this measures, on shapes scenes of the
position category:

- `answer`: the model's own greedy short answers to "Where is the shape?" (train and eval images), and the answer
  it gives most often (a constant answer means position was not learned at all);
- `probe`: a linear probe (multinomial logistic regression) fitted on the projector's output tokens of training
  images and scored on eval images, with the tokens flattened (`flat`: which token holds the shape), mean-pooled
  (`mean`: what one attention head averaging over image tokens could read), and the single most distinctive token
  (`token`: the shape's own token, as content-based attention would pick it).

A high `mean`/`token` probe with chance-level answers says the information is in the image tokens and the decoder
does not read it; a low probe says the vision side lost it. Prints a table and writes JSON.

Usage:
    python benchmarks/position_probe.py RUN/final [--out benchmarks/results/position_probe.json]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch

from nanovlm_cli.checkpoint.io import load_model
from nanovlm_cli.data.shapes import POSITIONS, shapes_records
from nanovlm_cli.generation import Engine, SamplingConfig, processor_for

POOLS = {
    "flat": lambda tokens: tokens.flatten(),
    "mean": lambda tokens: tokens.mean(0),
    "token": lambda tokens: tokens[(tokens - tokens.median(0).values).norm(dim=1).argmax()],
}


def _position_rows(split: str, n: int, seed: int) -> list:
    return [r for r in shapes_records(n, seed=seed, split=split, multiple_choice=0.0)
            if r.meta["category"] == "position"]


def answers(engine: Engine, processor, rows: list) -> dict:
    """Greedy short answers: accuracy and the (answer, prediction) counts."""
    counts: collections.Counter = collections.Counter()
    for start in range(0, len(rows), 32):
        chunk = rows[start:start + 32]
        prompts = [processor.encode_prompt(r.messages[:1], r.images) for r in chunk]
        for row, text in zip(chunk, engine.generate(prompts, SamplingConfig(max_new_tokens=4, greedy=True)).texts):
            counts[(row.meta["answer"], text.strip())] += 1
    correct = sum(v for (answer, said), v in counts.items() if answer == said)
    said = collections.Counter()
    for (_, prediction), v in counts.items():
        said[prediction] += v
    return {"accuracy": correct / max(1, sum(counts.values())), "most_said": said.most_common(1)[0],
            "n": sum(counts.values())}


@torch.no_grad()
def features(model, processor, rows: list, pool) -> tuple[torch.Tensor, torch.Tensor]:
    names = list(POSITIONS)
    xs, ys = [], []
    for row in rows:
        sample = processor.encode_prompt(row.messages[:1], row.images)
        xs.append(pool(model.encode_images(sample.images).float()))
        ys.append(names.index(row.meta["answer"]))
    return torch.stack(xs), torch.tensor(ys)


def probe(train: tuple[torch.Tensor, torch.Tensor], held_out: tuple[torch.Tensor, torch.Tensor],
          steps: int = 300) -> dict:
    """Fit a linear classifier on standardised features; train and held-out accuracy."""
    (x, y), (x_eval, y_eval) = train, held_out
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, x_eval = (x - mean) / std, (x_eval - mean) / std
    weight = torch.zeros(x.shape[1], len(POSITIONS), requires_grad=True)
    bias = torch.zeros(len(POSITIONS), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + 1e-3 * weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return {"train": ((x @ weight + bias).argmax(1) == y).float().mean().item(),
                "eval": ((x_eval @ weight + bias).argmax(1) == y_eval).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint directory (e.g. RUN/final)")
    parser.add_argument("--samples", type=int, default=2500, help="shapes records drawn per split (about 1 in 5 "
                        "is a position question)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/position_probe.json"))
    args = parser.parse_args()

    loaded = load_model(args.checkpoint)
    model = loaded.model.eval()
    processor = processor_for(model, loaded.tokenizer)
    rows = {split: _position_rows(split, args.samples, args.seed) for split in ("train", "eval")}
    engine = Engine(model, processor)
    result = {"checkpoint": str(args.checkpoint),
              "answer": {split: answers(engine, processor, r[:100]) for split, r in rows.items()},
              "probe": {name: probe(features(model, processor, rows["train"], pool),
                                    features(model, processor, rows["eval"], pool))
                        for name, pool in POOLS.items()},
              "chance": 1 / len(POSITIONS)}
    print(f"{'measure':<22}{'train':>8}{'eval':>8}")
    for split in ("train", "eval"):
        a = result["answer"][split]
        print(f"{'answers (' + split + ')':<22}{a['accuracy']:>16.2f}   most said: {a['most_said'][0]!r}")
    for name, scores in result["probe"].items():
        print(f"{'probe ' + name:<22}{scores['train']:>8.2f}{scores['eval']:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
