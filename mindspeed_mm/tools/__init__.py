"""User-facing command-line tools: feature extraction and the memory planner (tiny weights: `mindspeed_mm.tiny`)."""
