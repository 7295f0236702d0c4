"""The released OccFM architecture (Orbis36/OccFM-NeurIPS2025, NeurIPS 2025), re-implemented from reading.

The upstream repository has no licence, so nothing here is copied from it: these are our own modules, written
to compute the same function with the same ``state_dict`` keys and shapes, so that the released weights load.
Equivalence is checked against golden tensors produced by running the upstream code at reduced width
(``tools/occfm_reference.py``, not run by CI) and against the full-size key manifest
(``tests/goldens/occfm_state_dict_keys.tsv``). Study of the upstream code: ``../shared/occfm/PORT.md``.

- :mod:`.key_init`: weights derived from key names only (the goldens' weights).
- :mod:`.upstream_config`: the upstream YAML configs (``_BASE_CONFIG_`` includes) → constructor kwargs.
- :mod:`.swin_v2`, :mod:`.vae`: the Swin-V2 occupancy VAE (``OccFmVAE``, vae_swin_x16_h16).
- :mod:`.unet`: the flow net (``FLOW_MATCHING_DOWN_X4_DiT``), hist and fut variants.
- :mod:`.adapter`: the flow net behind this project's forecaster contract.
"""
