"""Concepts: how SAE features are grouped (clustering), how prompts are grouped (topics), how a
concept is named (labels, LLM explanations), and the concept sources stages 2 and 4 act on."""
