"""Experiments that combine the library: unlearning, toxicity purging, the benchmark, the demo."""
