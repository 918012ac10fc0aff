"""Fast paths for XVLA, one job a module (measurements and design notes: docs/performance.md):

- `sampling`: `FastGenerator` / `fast_generator`, the static-shape sampler (16-bit weights, CUDA graph, optional
  torch.compile) with the contract of `XVLA.generate`;
- `training`: `prepare_training` (regional torch.compile and activation checkpointing of the repeated layers),
  `fused_adamw`;
- `flops`: `count_flops` and `weight_bytes` from the config alone (meta device);
- `dynamo`: the torch.compile setting both compiled paths need.
"""
