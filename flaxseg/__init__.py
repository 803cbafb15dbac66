"""flaxseg."""
