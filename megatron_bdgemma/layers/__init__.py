"""Gemma 4 MoE building blocks on Megatron-Core: norm, RoPE, attention, MoE, layer."""
