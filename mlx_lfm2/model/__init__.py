"""The LFM2 network: config, blocks (one copy for dense and MoE), experts, caches, device choices."""
