"""Measuring what compression and fine-tuning cost: perplexity, embedding fidelity, classification."""
