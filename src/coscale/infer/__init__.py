"""Inference: generation over the latent KV cache and MTP speculative decoding."""

from coscale.infer.generate import GenerationStats, generate, generate_speculative

__all__ = ["generate", "generate_speculative", "GenerationStats"]
