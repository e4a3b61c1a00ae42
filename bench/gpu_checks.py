"""GPU-only checks of every model, for a session lent a GPU (part of bench/gpu_run.sh):

    python bench/gpu_checks.py [--out bench/results/gpu_checks.json]

For the `tiny` preset of the Transformer, Llama, the MoE and the VLM, with the same random weights
on the CPU and the GPU:
  - float32 on the GPU against float32 on the CPU (max |Δ logits|; TF32 is off);
  - bfloat16 autocast on the GPU against float32 (max |Δ logits|, and the share of positions
    whose arg-max token is the same);
  - torch.compile on the GPU against eager (max |Δ logits|);
  - one training step (forward + backward through each model's own loss) under bfloat16 autocast:
    the loss is finite and every parameter gets a finite gradient;
  - which fused scaled-dot-product-attention kernels (flash, memory-efficient, cuDNN) run for a
    causal bfloat16 attention.
Without a CUDA device it says so and exits 1. Prints one line per model and writes the JSON.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fromscratch.llama import Llama, LlamaConfig
from fromscratch.moe import MoEConfig, MoELlama
from fromscratch.transformer import Transformer, TransformerConfig
from fromscratch.vlm import VLM, VLMConfig


def models(generator: torch.Generator):
    """(name, model, inputs, a function that returns the logits, a function that returns the loss)."""
    vocab = 512
    src = torch.randint(5, vocab, (4, 24), generator=generator)
    tgt = torch.randint(5, vocab, (4, 20), generator=generator)
    yield ("transformer", Transformer(TransformerConfig.from_preset("tiny", vocab_size=vocab)),
           (src, tgt), lambda m, s, t: m(s, t), lambda m, s, t: m(s, t[:, :-1], targets=t[:, 1:]))
    ids = torch.randint(0, vocab, (4, 32), generator=generator)
    yield ("llama", Llama(LlamaConfig.from_preset("tiny")), (ids,), lambda m, x: m(x),
           lambda m, x: m(x[:, :-1], targets=x[:, 1:]))
    yield ("moe", MoELlama(MoEConfig.from_preset("tiny")), (ids,), lambda m, x: m(x),
           lambda m, x: m(x[:, :-1], targets=x[:, 1:]))
    config = VLMConfig.from_preset("tiny", vocab_size=vocab)
    pixels = torch.rand(4, 3, config.image_size, config.image_size, generator=generator)
    text = torch.randint(5, vocab, (4, 16), generator=generator)
    yield ("vlm", VLM(config), (pixels, text), lambda m, p, t: m(p, t).logits,
           lambda m, p, t: torch.nn.functional.cross_entropy(m(p, t).logits[:, :-1].flatten(0, 1), t[:, 1:].flatten()))


def check(model, inputs, logits_of, loss_of) -> dict:
    model.eval()
    with torch.no_grad():
        reference = logits_of(model, *inputs).float()
        gpu_model = model.to("cuda")
        gpu_inputs = [x.cuda() for x in inputs]
        fp32 = logits_of(gpu_model, *gpu_inputs).float().cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = logits_of(gpu_model, *gpu_inputs).float().cpu()
        started = time.perf_counter()
        compiled = torch.compile(gpu_model)
        compiled_logits = logits_of(compiled, *gpu_inputs).float().cpu()
        compile_seconds = time.perf_counter() - started
    gpu_model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_of(gpu_model, *gpu_inputs)
    loss.backward()
    grads_finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in gpu_model.parameters())
    return {
        "fp32_gpu_vs_cpu_max_abs": (fp32 - reference).abs().max().item(),
        "bf16_vs_fp32_max_abs": (bf16 - reference).abs().max().item(),
        "bf16_same_argmax": (bf16.argmax(-1) == reference.argmax(-1)).float().mean().item(),
        "compiled_vs_eager_max_abs": (compiled_logits - fp32).abs().max().item(),
        "compile_seconds": round(compile_seconds, 1),
        "bf16_train_loss": loss.item(),
        "bf16_train_finite": bool(torch.isfinite(loss)) and grads_finite,
    }


def sdpa_kernels() -> dict:
    """Which fused attention kernel runs for a (B, heads, T, head_dim) causal bf16 attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(8, 8, 512, 64, device="cuda", dtype=torch.bfloat16)
    found = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            found[backend.name] = "runs"
        except RuntimeError as error:
            found[backend.name] = f"unavailable: {str(error).splitlines()[0][:120]}"
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_checks.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_checks.py: no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "models": {}}
    for name, model, inputs, logits_of, loss_of in models(torch.Generator().manual_seed(0)):
        results["models"][name] = row = check(model, inputs, logits_of, loss_of)
        print(name, json.dumps(row), flush=True)
    results["sdpa"] = sdpa_kernels()
    print("sdpa", json.dumps(results["sdpa"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
