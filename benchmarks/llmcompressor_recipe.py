"""Check an exported llm-compressor recipe with llm-compressor itself: parse it, apply it with ``oneshot`` and
compare every projection's sparsity with the prunesearch config it came from.

Runs in a separate environment (llmcompressor 0.14 pins transformers <= 5.17; prunesearch does not depend on it):

    python3 -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install torch==2.13.0 llmcompressor
    prunesearch export --run RUN --format llmcompressor --out recipe.yaml
    prunesearch export --run RUN --out best.json
    /tmp/lcvenv/bin/python benchmarks/llmcompressor_recipe.py MODEL_DIR recipe.yaml best.json CALIB.txt
"""

from __future__ import annotations

import json
import sys

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.recipe import Recipe
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(model_dir: str, recipe_path: str, config_path: str, calib_path: str, seqlen: int = 32,
         samples: int = 8) -> None:
    """Apply the recipe on ``samples`` windows of ``calib_path`` and print target vs actual sparsity per layer."""
    recipe = Recipe.create_instance(recipe_path)
    print(f"parsed: {len(recipe.modifiers)} modifiers ({type(recipe.modifiers[0]).__name__})")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(model_dir)(open(calib_path).read())["input_ids"]
    rows = [ids[i * seqlen:(i + 1) * seqlen] for i in range(samples)]
    data = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seqlen for _ in rows]})
    oneshot(model=model, dataset=data, recipe=recipe_path, num_calibration_samples=samples, max_seq_length=seqlen)
    config = json.load(open(config_path))
    want, default = config["sparsity"], config.get("default", 0.0)
    worst = 0.0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            block = name.split(".layers.")[1].split(".")[0]
            target = want.get(name, want.get(block, default))
            got = (module.weight == 0).float().mean().item()
            worst = max(worst, abs(got - target))
            print(f"{name:40s} target {target:.4f} actual {got:.4f}")
    print(f"max |actual - target| = {worst:.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
