"""The advisor: hardware targets, schemes and recipes, shape validation, quantization, export and evaluation.

It takes local folders and tensors and knows nothing of the Hub, the CLI or how servers are started.
Public API: `targets.get_target`, `schemes.get_scheme`, `recipe.Recipe`, `validate.plan`, `model.inspect_structure`,
`export.quantize_and_export`, `export.load_for_eval`, `evaluate` (perplexity, KL, top-1, ECE).
"""
