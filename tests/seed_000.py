"""Seed 000's worked mix_cfg example (msModelSlim Calibrator priority rules)."""

SEED_MIX_CFG = {
    "model.layers.0.mlp.down_proj": "w8a16",  # exact name
    "model.layers.1.mlp.down_pro?": "w8a16",  # wildcard, matches
    "?q_proj": "w8a8_dynamic",  # wildcard, matches nothing
    "*q_proj": "float",  # wildcard, matches every q_proj
    "model.layers.[012].mlp.down_proj": "w8a8_dynamic",  # 0, 1 taken already: only 2
    "model.layers.[!456789].mlp.down_proj": "w8a16",  # 0-2 taken: only 3
    "Model.layers.4.mlp.down_proj": "w8a8_dynamic",  # differs in case: must not match
    "model.layers.5.mlp.down_proj": "w8a16",  # disable_names wins
}
