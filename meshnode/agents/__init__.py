"""Collaborative multi-agent runs over the mesh: scenarios, held contexts, patterns, baselines."""
