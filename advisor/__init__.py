"""The advisor: hardware targets, schemes, recipes and plans, compression, export and evaluation.

It takes local folders and tensors and knows nothing of the Hub, the CLI or how servers are started.
Public API, by step:
- `model.inspect_structure` (layers, heads, KV groups, MLP widths, fused units, from the model itself);
  `weight_files.check_weight_files` (damaged weight files, before any work); `targets.get_target`.
- `recommend.recommend(structure, target, Choices)` → `plan.Plan` (the default recipe for the user's choices), or
  `plan.resolve(Recipe, structure, target)` → `plan.Plan` for a recipe from a file; `recipe.Recipe` is its YAML form.
- `actions`: the per-unit action registry (quantize, dense, prune, factorize, remove-layer); `quantize`: the rounding
  methods; `structure_search.choose` (a model-level structure request → per-unit actions); `heal` (distillation).
- `architecture.register()` registers hubc's reshaped architectures with transformers; `architecture.adopt(model)`.
- `calibrate.Calibration.of(recipe, tokenizer)`; `compress.compress(model, plan, calibration)` → `Compressed`.
- `export.write_checkpoint(compressed, folder, dtype)` (compressed-tensors); `export.load_for_eval(folder)`.
- `evaluate` (perplexity, KL, top-1, ECE); `measurement` (the record every measurement is stored as).
"""
