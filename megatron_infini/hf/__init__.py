"""A Hugging Face model directory that runs the Infini memory (`trust_remote_code=True`).

`configuration_infini_llama.py` and `modeling_infini_llama.py` are self-contained (torch and
transformers only): `export.write_model_files` copies them into every directory that
`tools/convert_checkpoint.py to-hf` writes. `export` maps our config to theirs and refuses the
options the modeling file cannot express. See docs/checkpoints.md.
"""
