"""Evaluation: hallucination / capability benchmarks, an LLM-judge client and the before/after report.

Submodules are imported on use (no heavy import here).
"""
