"""Child-process entry of CPU measurements: `python -m nanovlm_cli.memory SPEC_JSON` prints one JSON line."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict

import torch

from nanovlm_cli.config import TrainConfig, VLMConfig
from nanovlm_cli.memory.estimate import SampleShape
from nanovlm_cli.memory.measure import measure_step

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Child-process entry: measure one spec (JSON) on the CPU and print the result as one JSON line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: python -m nanovlm_cli.memory SPEC_JSON\n")
        return 2
    spec = json.loads(args[0])
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    result = measure_step(VLMConfig.from_dict(spec["model"]), TrainConfig.from_dict(spec["train"]),
                          SampleShape(**spec["shape"]), int(spec["batch_size"]), steps=int(spec.get("steps", 2)))
    sys.stdout.write(json.dumps(asdict(result)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
