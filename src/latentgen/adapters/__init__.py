"""Adapters applied to a loaded model: LoRA / LyCORIS / PEFT deltas, textual-inversion vectors, VAE override."""
