"""Every training objective, one file per method: ``vae`` (the occupancy tokenizer), ``flow_matching`` (generic
conditional FM and the OccFM teacher), ``mfd`` (Mean Flow Distillation and its VSD baseline). ``base`` is the
contract with the training loop. Objectives use ``models`` and ``flow``; the engine uses them.
"""
