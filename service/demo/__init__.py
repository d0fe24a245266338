"""The project's own small demo base: preset, training recipe, evaluation, adapter fine-tuning.

* :mod:`service.demo.train_base` — builds ``service/assets/demo-base`` (two-stage recipe).
* :mod:`service.demo.evaluate` — held-out accuracy per question type / inspection field.
* :mod:`service.demo.finetune_adapter` — trains the demo ``line-inspection`` Dual-LoRA adapter.
"""
