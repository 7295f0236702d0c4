"""Every training objective, one file per method: ``vae`` (the occupancy tokenizer), ``flow_matching`` (generic
conditional FM and the OccFM teacher), ``mfd`` (Mean Flow Distillation and its VSD / Diff-Instruct baseline),
``dmd2`` (DMD2's distribution-matching loss), ``cd`` (one-step consistency distillation). ``base`` is the
contract with the training loop; ``occ_teacher`` loads an OccFM teacher snapshot for any distiller.
Objectives use ``models`` and ``flow``; the engine uses them.
"""
