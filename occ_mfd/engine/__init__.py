"""Training engine: one explicit loop for every stage (VAE, teacher, distillation).

Modules: ``objective`` (the Objective/loop contract), ``loop`` (``train(cfg, work_dir)``), ``builder``
(config → objects), ``optim`` (AdamW per param group), ``schedule`` (lr), ``ema``, ``checkpoint``
(save / load / rebuild an objective), ``data_loader`` (resumable sharded loader), ``distributed``,
``logging`` (progress line, log.jsonl, TensorBoard), ``latent_cache``, ``toys`` (test objectives).
Nothing is imported here, so importing the contract stays light.
"""
