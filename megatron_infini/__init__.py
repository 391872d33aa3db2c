"""megatron-infini: Infini-attention for Megatron-core models.

Nothing heavy is imported here: `import megatron_infini` is cheap and allocates nothing.
The names below are loaded on first use (they import megatron-core).
"""

__version__ = "0.1.0"

_LAZY = {
    "InfiniTransformerConfig": "megatron_infini.config",
    "llama_config": "megatron_infini.config",
    "get_gpt_layer_infini_spec": "megatron_infini.spec",
    "get_gpt_block_infini_spec": "megatron_infini.spec",
    "ensure_cpu_compat": "megatron_infini.compat",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megatron_infini' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
