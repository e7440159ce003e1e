"""Command-line tools: tiny official-layout weights, feature extraction, the memory planner."""
