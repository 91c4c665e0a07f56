#!/usr/bin/env python3
"""Runs INSIDE an engine image (--network none): dequantize a GGUF into a bf16 safetensors model.

usage: convert_gguf.py GGUF_PATH OUT_DIR

transformers reads the GGUF (weights + tokenizer) but refuses `save_pretrained` on a model it
marks as GGUF-quantized, so the state dict, config and tokenizer are saved separately.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(gguf_path: str, out_dir: str) -> None:
    gguf = Path(gguf_path)
    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.bfloat16)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = "bfloat16"
    config.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)

    # A real model, not noise: greedy decoding of a fact, recorded beside the files.
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    sample = tokenizer.decode(ids[0][prompt["input_ids"].shape[1] :])
    (out / "smoke.json").write_text(json.dumps({"prompt": "The capital of France is", "greedy": sample}) + "\n")
    print(f"converted {gguf.name}: {len(state)} tensors; greedy sample: {sample!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
