"""megatron-infini: Infini-attention for Megatron-core models.

Nothing heavy is imported here: `import megatron_infini` is cheap and allocates nothing.
"""

__version__ = "0.1.0"
