"""A real model's weights streamed from disk into the device: a transformers Llama.

    python examples/load_model.py                 # the GPU when torch sees one, else the host

A small Llama is built and saved (``save_pretrained``: safetensors), then built again on the
``meta`` device, which costs no memory, and each weight of the checkpoint is assigned to it as
soon as ``stream_safetensors`` has it on the device.  One forward pass is checked against the
same model loaded the ordinary way (safetensors' own loader).  On the host backend the tensors
arrive as NumPy arrays and the forward pass runs on the CPU (float32: NumPy has no bfloat16).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from aiopinned import stream_safetensors


def small_llama(layers: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                       num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                       tie_word_embeddings=False)  # fmt: skip


def assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in the place of the parameter (or buffer) ``name``."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


async def stream_into(model: torch.nn.Module, folder: Path, device: Any) -> int:
    """Each weight, as it lands on ``device`` (None: the host), into ``model``; how many."""
    count = 0
    async for name, tensor in stream_safetensors(folder, device):
        assign(model, name, tensor if device is not None else torch.from_numpy(tensor))
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--dir", type=Path, help="where to save it (default: a temp folder)")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda:0", torch.bfloat16) if on_gpu else (None, torch.float32)
    where = torch.device(device or "cpu")
    config = small_llama(args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp)
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(dtype).save_pretrained(folder, safe_serialization=True)
        with torch.device("meta"):
            model = LlamaForCausalLM(config).to(dtype)  # the skeleton: no memory
        t0 = time.perf_counter()
        count = asyncio.run(stream_into(model, folder, device))
        elapsed = time.perf_counter() - t0
        # The rotary embedding's buffers are not saved: made as the reference makes them (on the
        # CPU, cast to the dtype as ``.to(dtype)`` casts every float buffer, then moved), so
        # that both compute alike.
        with torch.device("cpu"):
            model.model.rotary_emb = type(model.model.rotary_emb)(config).to(dtype).to(where)
        reference = LlamaForCausalLM(config).to(dtype)
        reference.load_state_dict(load_file(folder / "model.safetensors"))
        reference.to(where)
    theirs_state = reference.state_dict()
    same = all(torch.equal(t, theirs_state[k]) for k, t in model.state_dict().items())
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.eval()(ids.to(where)).logits
        theirs = reference.eval()(ids.to(where)).logits
    params = sum(p.numel() for p in model.parameters())
    print(f"{count} weights ({params / 1e6:.1f} M parameters, {dtype}) streamed to {where} in "
          f"{elapsed * 1e3:.0f} ms; every weight equal: {same}; the forward pass matches "
          f"safetensors' load: {torch.equal(ours, theirs)}")  # fmt: skip
    assert same and torch.equal(ours, theirs), "the streamed model differs"


if __name__ == "__main__":
    main()
