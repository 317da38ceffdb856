"""Diagnostics: which block already looks like the teacher (`probe`), and its table, JSON and plot
(`report`). May import: choices, config, maths, models, teachers. No Lightning."""
