"""Training engine: one explicit loop for every stage (VAE, teacher, distillation).

Modules: ``loop`` (``train(cfg, work_dir)``), ``optim`` (AdamW per param group), ``schedule`` (lr), ``ema``,
``checkpoint`` (save / load / rebuild an objective for resuming), ``data_loader`` (resumable sharded loader),
``distributed``, ``logging`` (progress line, log.jsonl, TensorBoard), ``toys`` (test objectives).
The objectives it trains live in :mod:`occ_mfd.objectives`; the inference snapshots it writes are defined in
:mod:`occ_mfd.models.snapshot`. Nothing is imported here, so importing one module stays light.
"""
