"""LoRA adapters: read from files (no PyTorch), merged at start, listed from a directory, applied per request.

- layer_names: where an adapter's layer names (diffusers, kohya, kohya's original SDXL names) land in
  the Flax parameter tree;
- lora_file: one `.safetensors` file in the kohya / A1111 or diffusers / PEFT format, checked against the
  model from its header, loaded as float32 low-rank factors;
- fuse_spec, fusing: `--fuse-lora FILE[:SCALE]`, merged into the base weights before compiling;
- adapter_directory: `--lora-dir`, the adapters requests may name, rescanned so that new files appear
  without a restart.
- adapter_bank, device_bank, row_deltas: per-request adapters on the device (a bank of fixed places per
  component, written without recompiling; each UNet row and prompt adds its own adapters' deltas);
- residency, adapter_loads, request_adapters: which adapter holds which place, loads at step boundaries,
  a queued image admissible once its adapters are resident.
"""
