"""Inference: generation over the latent KV cache and MTP speculative decoding.

Imported lazily so that `coscale` commands that need no torch (analyze) start fast.
"""

__all__ = ["generate", "generate_speculative", "GenerationStats"]


def __getattr__(name):
    if name in __all__:
        from coscale.infer import decode

        return getattr(decode, name)
    raise AttributeError(f"module 'coscale.infer' has no attribute {name!r}")
